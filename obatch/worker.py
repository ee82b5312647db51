"""The batch worker of a long-running process (the server): drives every API batch to a final status.

One supervising task finds batches to run: at start every batch left active by a previous process (a crash, a
SIGKILL), then new ones, when told (``kick``) and by polling the store (a batch created by another process is
found too). Each batch runs ``batches.process`` in its own task; all of them lease engine slots from the services'
one pool (``Services.pool``: each host's level fixed by ``OBATCH_SERVER_CONCURRENCY`` or found by measuring), whose
waiters are served first come first served, so concurrent batches share the engines fairly and none starves.

Several processes may share one store: a batch is started only once its lease is claimed (``obatch.lease``), so
each batch is driven by one process at a time, and a dead process's batches are taken over when its leases expire.

``stop`` cancels everything promptly: requests in flight stay pending in the store and run again at the next start
(the store takes a line's result only once, so nothing is doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from obatch import _loop, batches, lease
from obatch.backends.pool import Pool
from obatch.bench.sweep_jobs import SweepRunner
from obatch.store import repo

log = logging.getLogger("obatch.worker")

MAX_FAILURES = 5  # a batch whose driving raised this many times in a row is failed, not retried for ever


class BatchWorker:
    """Runs the store's active API batches, sharing the services' engine pool among them."""

    def __init__(self, svc: batches.Services, *, poll_interval: float = 1.0) -> None:
        self.svc = svc
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # batch id -> (failures in a row, retry not before)
        self._supervisor: asyncio.Task[None] | None = None
        self.sweeps = SweepRunner(svc)  # benchmark sweeps, measured while no batch runs (obatch.bench.sweep_jobs)

    @property
    def running(self) -> list[str]:
        """Ids of the batches being driven now."""
        return list(self._tasks)

    @property
    def pool(self) -> Pool | None:
        """The engine hosts the batches lease from (with their levels), for ``/health``."""
        return self.svc.pool

    def describe(self) -> list[dict[str, Any]] | None:
        """The engine hosts as the batches see them (levels learned while they run), for ``/health``."""
        pool = self.pool
        return pool.describe() if pool is not None else None

    async def refresh(self) -> None:
        """Bring ``describe`` and ``running`` up to date: nothing to do here (a worker elsewhere is asked)."""

    async def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="obatch-worker")

    def kick(self) -> None:
        """Look for new batches now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the supervisor and every batch task, and wait for them to unwind."""
        tasks = [t for t in (self._supervisor, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sweeps.stop()
        self._supervisor = None
        self._tasks.clear()

    async def _supervise(self) -> None:
        while True:
            try:
                await self.scan()
                await self.sweeps.scan()
            except Exception:
                log.exception("worker: scanning the store failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def scan(self) -> None:
        """Start a task for every active API batch that has none and whose lease this process can claim."""
        async with self.svc.sessions() as session:
            ids = await repo.active_batch_ids(session, source="api")
        now = time.monotonic()
        for batch_id in ids:
            if batch_id in self._tasks or self._failures.get(batch_id, (0, 0.0))[1] > now:
                continue
            try:
                await lease.claim(self.svc.sessions, self.svc.settings, batch_id, self.svc.owner, self.svc.clock)
            except lease.BatchBusy:
                continue  # another process drives it
            self._tasks[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch {batch_id}")

    async def _drive(self, batch_id: str) -> None:
        try:
            done = await batches.process(self.svc, batch_id)
            self._failures.pop(batch_id, None)
            log.info("batch finished", extra={"batch_id": batch_id, "status": done.status})
        except (lease.BatchBusy, lease.LeaseLost) as exc:
            log.warning("worker: batch left to another process", extra={"batch_id": batch_id, "reason": str(exc)})
        except Exception as exc:
            count = self._failures.get(batch_id, (0, 0.0))[0] + 1
            log.exception("worker: batch run failed", extra={"batch_id": batch_id, "failures": count})
            if count >= MAX_FAILURES:
                self._failures.pop(batch_id, None)
                async with self.svc.sessions() as session:
                    await repo.mark_failed(session, batch_id, "internal_error",
                                           f"The batch could not be run ({type(exc).__name__}).",
                                           int(self.svc.clock()))
                    await session.commit()
            else:
                self._failures[batch_id] = (count, time.monotonic() + min(2.0 ** count, 60.0))
        finally:
            self._tasks.pop(batch_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.release(self.svc.sessions, batch_id, self.svc.owner))


class ThreadedWorker(BatchWorker):
    """A ``BatchWorker`` on an event loop of its own, in a thread, with its own store engine and engine client.

    Driving batches flat out keeps an event loop busy (building, sending and parsing engine requests, committing
    results): on the server's loop, every API request waited behind that work (figures in CHANGELOG.md, Server). On
    a loop of its own, the API's loop only waits for its turn at the GIL.
    ``open_services`` opens (and closes) what the worker's loop needs; it runs on that loop.
    """

    def __init__(self, open_services: Callable[[], AbstractAsyncContextManager[batches.Services]], *,
                 poll_interval: float = 1.0) -> None:
        self._open = open_services
        self._poll_interval = poll_interval
        self._inner: BatchWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def pool(self) -> Pool | None:
        """The worker thread's own pool (its levels are learned there); None until it has started."""
        return self._inner.svc.pool if self._inner is not None else None

    @property
    def running(self) -> list[str]:
        inner = self._inner
        for _ in range(10):  # the worker's thread may change the dict while it is copied
            with contextlib.suppress(RuntimeError):
                return list(inner._tasks) if inner is not None else []
        return []

    async def start(self) -> None:
        if self._thread is None:
            # The worker's thread is busy: let the API's loop have the GIL back within 0.5 ms, not 5.
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
            self._thread = threading.Thread(target=_loop.run, args=(self._main(),), name="obatch-worker",
                                            daemon=True)
            self._thread.start()
            await asyncio.to_thread(self._ready.wait)
            if self._error is not None:
                raise self._error

    def kick(self) -> None:
        loop, inner = self._loop, self._inner
        if loop is not None and inner is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(inner.kick)

    async def stop(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._thread = None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            async with self._open() as svc:
                self._inner = BatchWorker(svc, poll_interval=self._poll_interval)
                await self._inner.start()
                self._ready.set()
                try:
                    await self._stopping.wait()
                finally:
                    await self._inner.stop()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()
