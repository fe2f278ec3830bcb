"""What the embedded services share: scratch directories, process and port checks, small file reads."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

__all__ = [
    "SCRATCH_ROOT", "STATE_FILE", "START_TIMEOUT_SECONDS", "STOP_TIMEOUT_SECONDS",
    "EmbeddedServiceError", "free_ports", "http_ok", "is_our_process", "is_running",
    "make_scratch", "port_is_free", "read_first_int", "read_json", "reap_orphans",
    "remove_weed_sockets", "tail", "terminate",
]  # fmt: skip

SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
STATE_FILE = "state.json"
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0


class EmbeddedServiceError(RuntimeError):
    """An embedded service failed to start; the message ends with the tail of its log."""


def make_scratch(prefix: str) -> Path:
    reap_orphans(prefix)
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_ROOT))
    (scratch / STATE_FILE).write_text(json.dumps({"owner": os.getpid()}))
    return scratch


def reap_orphans(prefix: str) -> None:
    """Stop the servers of, and delete, scratch dirs whose owning process is gone."""
    for scratch in SCRATCH_ROOT.glob(prefix + "*"):
        state = read_json(scratch / STATE_FILE)
        owner = state.get("owner") if isinstance(state, dict) else None
        if owner is None or is_running(owner):
            continue
        # Their data is about to be deleted: the quickest stop will do (SIGQUIT is
        # PostgreSQL's immediate shutdown, which also ends its backends).
        if state.get("pid"):
            terminate(state["pid"], scratch, sig=signal.SIGKILL)
            remove_weed_sockets(state.get("ports", {}))
        postmaster = read_first_int(scratch / "data" / "postmaster.pid")
        if postmaster:
            terminate(postmaster, scratch, sig=signal.SIGQUIT)
        shutil.rmtree(scratch, ignore_errors=True)


def remove_weed_sockets(ports: dict[str, int]) -> None:
    # weed leaves its Unix sockets in /tmp (whatever TMPDIR says), named after its ports.
    for port in ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def terminate(pid: int, marker: Path, sig: int = signal.SIGTERM) -> None:
    """Signal ``pid`` if it is still the process we started, and wait until it is gone."""
    if not is_our_process(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        for signum in (sig, signal.SIGKILL):
            os.kill(pid, signum)
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not is_running(pid):
                return


def is_our_process(pid: int, marker: Path) -> bool:
    """True when ``pid`` runs and its command line names ``marker`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return is_running(pid) and str(marker).encode() in cmdline


def is_running(pid: int) -> bool:
    """True until ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As Go's listeners do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    # Hold all sockets open at once so the kernel hands out n distinct ports.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_first_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text)
