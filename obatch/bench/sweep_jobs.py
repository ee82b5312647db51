"""Sweeps the server runs (``POST /v1/benchmarks/sweeps``): on the server's own backend, into the server's store.

A sweep is a row in ``bench_sweeps`` (so a restarted server resumes it) and a benchmark run (``bench_runs``) whose
points it measures in ``obatch bench``'s order; after a restart only the missing points are measured.

Sweeps and batches share the engine by taking turns, batches first: a point is measured only while no batch of
the server is active, because a point measured beside a batch reports the batch's load, not the configuration's
speed, and reloading the engine for a point's num_ctx would slow the batch down. While batches run, the sweep
waits (``current`` says so); a batch that starts during a point stops that point at once, and the point is
measured again from scratch once the batches are done. Batches are never held back by a sweep.

One process drives a sweep at a time (its lease, as for a batch), and one sweep at a time per process: points
measured side by side would disturb each other just as a batch does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson

from obatch import batches, lease
from obatch.bench import measure as measuring
from obatch.bench.schemas import SWEEP_ACTIVE, Sweep, SweepParams
from obatch.errors import ConflictError
from obatch.protocol import new_id
from obatch.runner import RetryPolicy
from obatch.store import bench_repo, repo
from obatch.store.bench_tables import BenchRunRow, BenchSweepRow
from obatch.store.db import Sessions

log = logging.getLogger("obatch.sweeps")

POLL = 0.5  # seconds between looks at the store (cancel asked? a batch arrived?) while a point runs


def to_wire(row: BenchSweepRow) -> Sweep:
    return Sweep(id=row.id, status=row.status,
                 params=SweepParams.model_validate_json(row.params_json), created_at=row.created_at,
                 started_at=row.started_at, finished_at=row.finished_at, points_done=row.points_done,
                 points_total=row.points_total, current=row.current, run_id=row.run_id, backend=row.backend,
                 error=row.error)


def engine_requests(params: SweepParams) -> int:
    """The engine requests a sweep sends: each point (model × num_ctx × level × repeat) sends ``requests``."""
    return params.points * params.requests


def new_row(params: SweepParams, owner: str | None, *, now: float | None = None) -> BenchSweepRow:
    """A queued sweep's row (the worker starts it)."""
    return BenchSweepRow(id=new_id("sweep"), owner=owner, status="queued", params_json=params.model_dump_json(),
                         requests=engine_requests(params), created_at=time.time() if now is None else now,
                         points_total=params.points)


async def create(sessions: Sessions, params: SweepParams, owner: str | None, *, now: float | None = None) -> Sweep:
    """Queue a sweep; the worker starts it."""
    row = new_row(params, owner, now=now)
    async with sessions() as session:
        bench_repo.add(session, row)
        await session.commit()
    return to_wire(row)


async def cancel(sessions: Sessions, sweep_id: str, owner: str | None) -> Sweep:
    """A queued sweep is cancelled at once; a running one becomes ``cancelling`` until its driver stops (points
    already measured are kept). A finished sweep cannot be cancelled (409)."""
    async with sessions() as session:
        row = await bench_repo.get_sweep(session, sweep_id, owner)
        if row.status not in SWEEP_ACTIVE:
            raise ConflictError(f"Sweep {sweep_id} is {row.status} and cannot be cancelled.",
                                code="sweep_not_active")
        if not await bench_repo.update_sweep(session, sweep_id, only_if=["queued"], status="cancelled",
                                             finished_at=time.time(), current=None):
            await bench_repo.update_sweep(session, sweep_id, only_if=["in_progress"], status="cancelling")
        await session.commit()
        return to_wire(await bench_repo.get_sweep(session, sweep_id, fresh=True))


def spec_of(params: SweepParams, sweep_id: str) -> measuring.SweepSpec:
    return measuring.SweepSpec(models=params.models, num_ctx=params.num_ctx, concurrency=params.concurrency,
                               requests=params.requests, workload=params.workload, repeats=params.repeats,
                               name=params.name or f"sweep {sweep_id}", rates=params.rates,
                               arrival=params.arrival, max_concurrency=params.max_concurrency)


class Cancelled(Exception):
    """The sweep was cancelled through the API while it ran."""


class SweepRunner:
    """Drives the store's sweeps, one at a time, on a worker's services (its backend, store and settings)."""

    def __init__(self, svc: batches.Services, *, poll: float = POLL) -> None:
        self.svc = svc
        self.poll = poll
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def scan(self) -> None:
        """Start the oldest active sweep this process can claim, unless one runs here already."""
        if self.running:
            return
        async with self.svc.sessions() as session:
            ids = await bench_repo.active_sweep_ids(session)
        for sweep_id in ids:
            try:
                await lease.claim(self.svc.sessions, self.svc.settings, sweep_id, self.svc.owner, self.svc.clock)
            except lease.BatchBusy:
                continue
            self._task = asyncio.create_task(self._drive(sweep_id), name=f"sweep {sweep_id}")
            return

    async def stop(self) -> None:
        """Leave the sweep where it is (``in_progress``: the next start resumes it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _set(self, sweep_id: str, **values: Any) -> None:
        async with self.svc.sessions() as session:
            await bench_repo.update_sweep(session, sweep_id, **values)
            await session.commit()

    async def _check(self, sweep_id: str) -> int:
        """How many batches are active (raises ``Cancelled`` when the sweep was asked to stop)."""
        async with self.svc.sessions() as session:
            row = await bench_repo.get_sweep(session, sweep_id)
            if row.status == "cancelling":
                raise Cancelled
            return len(await repo.active_batch_ids(session, source="api"))

    async def _drive(self, sweep_id: str) -> None:
        try:
            async with lease.hold(self.svc.sessions, self.svc.settings, sweep_id, self.svc.owner, self.svc.clock):
                await self._run(sweep_id)
        except Cancelled:
            await self._set(sweep_id, status="cancelled", finished_at=time.time(), current=None)
            log.info("sweep cancelled", extra={"sweep_id": sweep_id})
        except (lease.BatchBusy, lease.LeaseLost):
            log.warning("sweep left to another process", extra={"sweep_id": sweep_id})
        except Exception as exc:
            log.exception("sweep failed", extra={"sweep_id": sweep_id})
            with contextlib.suppress(Exception):
                await self._set(sweep_id, status="failed", finished_at=time.time(), current=None,
                                error=str(exc) or type(exc).__name__)

    async def _run_row(self, row: BenchSweepRow, spec: measuring.SweepSpec) -> tuple[BenchRunRow, dict[str, Any]]:
        backend = self.svc.backend
        if row.run_id is not None:
            async with self.svc.sessions() as session:
                run = await bench_repo.get_run(session, row.run_id)
            return run, orjson.loads(run.environment_json or "{}")
        run, env = await measuring.start_run(self.svc.sessions, spec, backend, fresh=True,
                                             params={"sweep_id": row.id}, notebook=None)
        return run, env

    async def _run(self, sweep_id: str) -> None:
        async with self.svc.sessions() as session:
            row = await bench_repo.get_sweep(session, sweep_id)
        if row.status == "cancelling":
            raise Cancelled
        params = SweepParams.model_validate_json(row.params_json)
        spec = spec_of(params, sweep_id)
        await self._set(sweep_id, status="in_progress", started_at=row.started_at or time.time(),
                        current="preparing the engine")
        run, env = await self._run_row(row, spec)
        async with self.svc.sessions() as session:
            done = await bench_repo.done_points(session, run.id)
        points = spec.points()
        todo = [p for p in points if p.config not in done]
        count = len(points) - len(todo)
        await self._set(sweep_id, run_id=run.id, backend=run.backend, points_done=count)
        policy = RetryPolicy.from_settings(self.svc.settings, max_attempts=3)
        workload = spec.resolved_workload()
        for key in todo:
            requests = workload.requests(key.model, spec.requests + spec.warmup, seed=spec.seed + key.repeat)
            measured = None
            while measured is None:
                await self._wait_for_batches(sweep_id)
                await self._set(sweep_id, current=f"{key.model} · num_ctx {key.num_ctx} · {key.load}"
                                + (f" · repeat {key.repeat + 1}" if spec.repeats > 1 else ""))
                measured = await self._measure(sweep_id, key, requests, spec, policy)
            async with self.svc.sessions() as session:
                await bench_repo.add_point(session, measuring.point_row(run, measured, env),
                                           measuring.sample_rows(measured))
                count += 1
                await bench_repo.update_sweep(session, sweep_id, points_done=count)
                await session.commit()
        async with self.svc.sessions() as session:
            run_row = await bench_repo.get_run(session, run.id)
            run_row.status, run_row.finished_at = "completed", time.time()
            await bench_repo.update_sweep(session, sweep_id, status="completed", finished_at=time.time(),
                                          current=None)
            await session.commit()

    async def _wait_for_batches(self, sweep_id: str) -> None:
        waiting = False
        while (active := await self._check(sweep_id)) > 0:
            if not waiting:
                await self._set(sweep_id, current=f"waiting for {active} batch(es) to finish")
                waiting = True
            await asyncio.sleep(self.poll)

    async def _measure(self, sweep_id: str, key: measuring.PointKey, requests: Any, spec: measuring.SweepSpec,
                       policy: RetryPolicy) -> measuring.MeasuredPoint | None:
        """Measure one point, watching the store: None when a batch started meanwhile (the point is void)."""
        task = asyncio.create_task(measuring.measure_point(
            self.svc.backend, key, requests, warmup=spec.warmup, policy=policy,
            max_failure_rate=spec.max_failure_rate, seed=spec.seed + key.repeat))
        try:
            while True:
                finished, _ = await asyncio.wait({task}, timeout=self.poll)
                if finished:
                    return task.result()
                if await self._check(sweep_id) > 0:
                    log.info("a batch started during a sweep point; measuring it again later",
                             extra={"sweep_id": sweep_id})
                    return None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
