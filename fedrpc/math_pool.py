"""Worker processes for CPU-heavy math, off the event loop and off the threads S3 I/O shares.

A PLD estimate runs seconds of FFTs; a new (noise, rate) pair's RDP curve up to
~50 ms of numpy. On the event loop that stalls every other call; in the default
thread pool it holds the threads every S3 transfer waits for, and a thread
cannot be stopped once it runs. So heavy math runs here, in a few worker
*processes* (docs/privacy.md, "Where the math runs"):

* **Start.** Nothing starts until the first job, so an app that never needs
  the pool pays nothing. Workers come from a ``forkserver``: a clean,
  single-threaded process that imported the kernels once, so a worker starts in
  ~10 ms and never inherits the server's threads or sockets (``fork`` would).
  Where there is no forkserver, ``spawn``. The first start of the forkserver
  (~1 s: numpy and scipy) blocks a helper thread, not the loop. Workers run at
  a lower CPU priority (nice +10): on a busy machine serving calls comes first.
  As with any ``spawn``/``forkserver`` code, a program that embeds the server
  must guard its main module (``if __name__ == "__main__":``).
* **Lanes.** A job is *quick* (an RDP curve: tens of ms at most) or *heavy* (a
  PLD composition). Heavy jobs run on at most ``workers - 1`` workers (1 with
  one worker), so a quick job, such as pricing a round's charge inside its
  selection transaction, waits for at most one other quick job, never behind a
  queue of PLD estimates; waiting quick jobs are served first.
* **Bound.** At most ``workers + queue`` jobs are admitted (running or
  waiting); one more is refused at once with ``rate_limited``
  (``data.retry_after``, ``data.reason = "math_pool_busy"``): a retryable
  answer instead of an unbounded backlog.
* **Time limit.** A job is handed to a worker only when that worker is free, so
  the clock starts when the job starts; waiting in the queue does not count.
  Past ``time_limit`` the caller gets ``bad_request`` (``data.reason =
  "too_expensive"``, ``data.time_limit_seconds``): the same request would take
  as long again, so it must ask for less. The pool's workers are then killed
  and replaced, so the runaway job stops holding a worker; a job that was
  running on the other worker is run once more on the new pool.
* **Cancellation.** A caller that goes away while its job waits withdraws it;
  once running, the job keeps its worker until it ends or hits the limit.
"""

from __future__ import annotations

import asyncio
import collections
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from fedrpc.errors import BadRequest, InternalError, RateLimited

__all__ = ["MathPool"]

T = TypeVar("T")

#: Imported once by the forkserver, so every worker starts with them loaded.
PRELOAD = ("fedrpc.fl.privacy",)
START_TIMEOUT = 120.0  # the first forkserver start imports numpy and scipy
WORKER_NICENESS = 10  # added to the workers' nice value: heavy math yields to serving calls


def _lower_priority() -> None:
    """Worker initializer: on a busy machine the event loop's process gets the CPU first."""
    if hasattr(os, "nice"):
        os.nice(WORKER_NICENESS)


def _started(pause: float) -> int:
    """A start-up job: overlapping ones make the executor spawn every worker."""
    time.sleep(pause)
    return os.getpid()


def _kill(executor: ProcessPoolExecutor) -> None:
    # concurrent.futures has no public way to stop a running job before 3.14
    # (kill_workers); the processes are the executor's own.
    kill = getattr(executor, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.kill()


class MathPool:
    """A bounded pool of worker processes with a per-job time limit (see the module doc).

    Parameters
    ----------
    workers : int
        Worker processes (>= 1).
    queue : int
        Jobs that may wait for a worker beyond those running (>= 0).
    time_limit : float
        Seconds a job may run once started.
    """

    def __init__(self, *, workers: int = 2, queue: int = 32, time_limit: float = 10.0) -> None:
        if workers < 1 or queue < 0 or not time_limit > 0:
            raise ValueError("MathPool needs workers >= 1, queue >= 0 and a time limit > 0")
        self.workers, self.queue, self.time_limit = workers, queue, time_limit
        self.heavy_limit = max(1, workers - 1)
        self.recycled = 0  # how many times the workers were killed and replaced
        self._free = workers
        self._heavy_running = 0
        # Admitted jobs per lane (quick: True), each bounded by workers + queue on its own:
        # a crowd of heavy estimates must not refuse the quick pricing a DP round's selection
        # or an analytics charge waits for.
        self._admitted = {True: 0, False: 0}
        # Heavy jobs one owner (an organization) may have admitted at once: a quarter of the
        # lane, so one tenant's crowd of estimates leaves room for the others'.
        self.per_owner = max(1, (workers + queue) // 4)
        self._by_owner: collections.Counter[str] = collections.Counter()
        self._waiting: dict[bool, collections.deque[asyncio.Future]] = {
            True: collections.deque(),  # quick
            False: collections.deque(),  # heavy
        }
        self._executor: ProcessPoolExecutor | None = None
        self._starting: asyncio.Task | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> MathPool:
        return cls(
            workers=settings.math_workers,
            queue=settings.math_queue,
            time_limit=settings.math_time_limit_seconds,
        )

    # -- the one public call ------------------------------------------------------------------

    async def run(
        self, fn: Callable[..., T], /, *args: Any, quick: bool = False, owner: str | None = None
    ) -> T:
        """``fn(*args)`` in a worker process; ``fn`` and its arguments must pickle.

        Raises
        ------
        RateLimited
            ``workers + queue`` jobs of this lane, or ``per_owner`` heavy jobs of this
            ``owner``, are already admitted (retry later).
        BadRequest
            The job ran longer than ``time_limit`` (``data.reason = "too_expensive"``).
        InternalError
            A worker died on its own (out of memory, say), or the pool is closed.
        """
        if self._closed:
            raise InternalError("the server is shutting down")
        owner = None if quick else owner
        if self._admitted[quick] >= self.workers + self.queue or (
            owner is not None and self._by_owner[owner] >= self.per_owner
        ):
            raise RateLimited(
                "the server is busy with other heavy computations; retry later",
                retry_after=max(1, math.ceil(self.time_limit / 4)),
                reason="math_pool_busy",
            )
        self._admitted[quick] += 1
        if owner is not None:
            self._by_owner[owner] += 1
        try:
            await self._acquire(quick)
            try:
                return await self._run_started(fn, args, quick)
            finally:
                self._release(quick)
        finally:
            self._admitted[quick] -= 1
            if owner is not None:
                self._by_owner[owner] -= 1
                if not self._by_owner[owner]:
                    del self._by_owner[owner]

    async def _run_started(self, fn: Callable[..., T], args: tuple, quick: bool) -> T:
        for attempt in (0, 1):
            executor = await self._ready()
            job = executor.submit(fn, *args)
            try:
                return await asyncio.wait_for(_awaitable(job), self.time_limit)
            except TimeoutError:
                self._recycle(executor)
                raise BadRequest(
                    f"the computation did not finish within the server's limit of "
                    f"{self.time_limit:g} s; ask for a cheaper one",
                    reason="too_expensive",
                    time_limit_seconds=self.time_limit,
                ) from None
            except asyncio.CancelledError:
                # The caller went away but the worker is busy: keep its slot until
                # the job ends (or hits the limit), so the next job starts at once.
                await asyncio.shield(self._drain(job, executor))
                raise
            except BrokenProcessPool:
                recycled_by_another = executor is not self._executor
                self._recycle(executor)
                if attempt == 0 and recycled_by_another:
                    continue  # another job's time-out killed this one: run it again
                raise InternalError(
                    "the worker computing this stopped unexpectedly; retry later"
                ) from None
        raise AssertionError("unreachable")

    async def _drain(self, job: Future, executor: ProcessPoolExecutor) -> None:
        try:
            await asyncio.wait_for(_awaitable(job), self.time_limit)
        except TimeoutError:
            self._recycle(executor)
        except Exception:  # noqa: BLE001 - nobody is waiting for this answer any more
            pass

    # -- admission: free workers, two lanes -----------------------------------------------

    def _may_start(self, quick: bool) -> bool:
        return self._free > 0 and (quick or self._heavy_running < self.heavy_limit)

    async def _acquire(self, quick: bool) -> None:
        lane = self._waiting[quick]
        if not lane and (quick or not self._waiting[True]) and self._may_start(quick):
            self._take(quick)
            return
        turn = asyncio.get_running_loop().create_future()
        lane.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release(quick)  # granted as we were cancelled: pass it on
            elif turn in lane:
                lane.remove(turn)
            raise

    def _take(self, quick: bool) -> None:
        self._free -= 1
        if not quick:
            self._heavy_running += 1

    def _release(self, quick: bool) -> None:
        self._free += 1
        if not quick:
            self._heavy_running -= 1
        for lane in (True, False):  # quick jobs first
            while self._waiting[lane] and self._may_start(lane):
                turn = self._waiting[lane].popleft()
                if not turn.done():
                    self._take(lane)
                    turn.set_result(None)

    # -- the executor: lazy start, recycle, close ----------------------------------------

    async def _ready(self) -> ProcessPoolExecutor:
        if self._closed:
            raise InternalError("the server is shutting down")
        if self._executor is None:
            if self._starting is None:
                self._starting = asyncio.get_running_loop().create_task(self._start())
                # Its failure reaches every waiter; none waiting (all cancelled) is no loss.
                self._starting.add_done_callback(lambda t: t.cancelled() or t.exception())
            await asyncio.shield(self._starting)
        if self._executor is None:
            raise InternalError("the server is shutting down")
        return self._executor

    async def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            executor = await loop.run_in_executor(self._helper_thread(), self._start_blocking)
            if self._closed:
                _kill(executor)
                await loop.run_in_executor(self._helper_thread(), executor.shutdown, True)
                return
            self._executor = executor
        finally:
            self._starting = None

    def _start_blocking(self) -> ProcessPoolExecutor:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload(list(PRELOAD))
        executor = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_lower_priority
        )
        try:
            # Overlapping start-up jobs spawn every worker now, so a job's clock
            # never includes a worker's start.
            started = [executor.submit(_started, 0.05) for _ in range(self.workers)]
            done, pending = wait(started, timeout=START_TIMEOUT)
            if pending or any(f.exception() for f in done):
                raise InternalError("the math workers did not start; retry later")
        except BaseException:
            _kill(executor)
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        return executor

    def _recycle(self, executor: ProcessPoolExecutor) -> None:
        """Kill ``executor``'s workers; the next job starts a new pool."""
        if self._executor is executor:
            self._executor = None
            self.recycled += 1
        _kill(executor)
        if self._closed:  # close() joins what it stops; the helper thread may be gone
            executor.shutdown(wait=False, cancel_futures=True)
        else:  # joining the dead workers blocks for a moment: in the helper thread
            self._helper_thread().submit(executor.shutdown, True, cancel_futures=True)

    def _helper_thread(self) -> ThreadPoolExecutor:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="fedrpc-math-pool")
        return self._helper

    async def close(self) -> None:
        """Stop the workers (at app cleanup); later calls get ``internal_error``."""
        self._closed = True
        for lane in self._waiting.values():
            while lane:
                turn = lane.popleft()
                if not turn.done():
                    turn.set_exception(InternalError("the server is shutting down"))
        if self._starting is not None:
            await asyncio.gather(asyncio.shield(self._starting), return_exceptions=True)
        executor, self._executor = self._executor, None
        loop = asyncio.get_running_loop()
        if executor is not None:
            if self._free < self.workers:
                _kill(executor)  # a job still running: nobody will read its answer
            await loop.run_in_executor(self._helper_thread(), executor.shutdown, True)
        if self._helper is not None:
            await loop.run_in_executor(None, self._helper.shutdown, True)
            self._helper = None


def _awaitable(job: Future) -> asyncio.Future:
    """An asyncio view of ``job``; an answer nobody awaits any more is not logged as lost.

    Cancelling it cancels ``job`` only if no worker has taken it yet.
    """
    view = asyncio.wrap_future(job)
    view.add_done_callback(lambda f: f.cancelled() or f.exception())
    return view
