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

``postgres`` and ``s3`` hold one service each; ``_process`` the scratch
directories, process and port checks they share.
"""

from fedrpc.embedded._process import SCRATCH_ROOT, EmbeddedServiceError
from fedrpc.embedded.postgres import EmbeddedPostgres
from fedrpc.embedded.s3 import EmbeddedS3

__all__ = ["SCRATCH_ROOT", "EmbeddedPostgres", "EmbeddedS3", "EmbeddedServiceError"]
