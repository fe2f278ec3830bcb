"""PostgreSQL 16 started by pgserver, reachable through a Unix socket only (see the package notes)."""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import subprocess
import warnings
from pathlib import Path

from fedrpc.embedded._process import EmbeddedServiceError, is_running, make_scratch, read_json, tail

__all__ = ["EmbeddedPostgres"]


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
        scratch = make_scratch("fedrpc-pg-")
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
                f"PostgreSQL did not start in {self.data_dir}\n{tail(self.log_path)}"
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


def _import_pgserver():
    # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset and
    # falls back to /tmp/runtime-$UID, which is what we want anyway.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver
    # It narrates every pg_ctl call at INFO; its failures still come through.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def _forget_dead_handles(path: Path) -> None:
    # pgserver counts the processes using a server in this file and stops the
    # server when the last one leaves; a process that was killed never leaves.
    pids = read_json(path) or []
    alive = [pid for pid in pids if is_running(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))
