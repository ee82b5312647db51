"""The scheduler: jobs pulled as engine slots free up, retries for transient faults only, one outcome per job.

A job is taken only when a host of the pool (``obatch.backends.pool``) has a free slot under its level — fixed, or
found by measuring (``obatch.concurrency``) — so work is pulled, never split into fixed chunks up front, and a slow
request never idles the other slots. Each attempt is bounded by a timeout; transient faults (``TransientError``:
503 busy, 5xx, connection faults, timeouts) are retried with exponential backoff and jitter through tenacity, each
retry on whichever host has room; anything else fails the line at once. Every job yields exactly one ``Outcome``.
Cancelling the task that awaits ``run_jobs`` stops it promptly; outcomes already handed to the sink are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from obatch import errors, structured
from obatch.backends.base import Backend, Result, translate
from obatch.backends.pool import Host, Lease, Pool

if TYPE_CHECKING:
    from tenacity import AsyncRetrying

    from obatch.config import Settings


@dataclass(slots=True)
class Job:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]
    num_ctx: int | None = None
    prompt_estimate: int = 0


@dataclass(slots=True)
class Outcome:
    job: Job
    result: Result | None
    error: errors.BackendError | None
    latency_ms: float
    attempts: int
    finished_at: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    initial_wait: float = 0.5
    max_wait: float = 30.0
    timeout: float = 600.0
    output_retries: int = 2  # answers refused by the structured-output check that are asked again (obatch.structured)

    @classmethod
    def from_settings(cls, settings: Settings, *, max_attempts: int | None = None) -> RetryPolicy:
        """The policy the settings describe; ``max_attempts`` caps their attempts (a benchmark retries less)."""
        attempts = settings.max_attempts if max_attempts is None else min(settings.max_attempts, max_attempts)
        return cls(max_attempts=attempts, initial_wait=settings.retry_initial_wait, max_wait=settings.retry_max_wait,
                   timeout=settings.request_timeout, output_retries=settings.output_retries)


Sink = Callable[[Outcome], Awaitable[None]]


@runtime_checkable
class JobSource(Protocol):
    """Chooses the job for a slot leased on a host (``obatch.schedule``); told when each job has ended."""

    async def next(self, host: Host) -> Job | None: ...

    def finished(self, job: Job, result: Result | None) -> None: ...


class InOrder:
    """The jobs of an iterator in its order, whichever host a slot is on."""

    def __init__(self, jobs: AsyncIterator[Job]) -> None:
        self._jobs = aiter(jobs)

    async def next(self, host: Host) -> Job | None:
        return await anext(self._jobs, None)

    def finished(self, job: Job, result: Result | None) -> None:
        pass


def _retrying(policy: RetryPolicy, pool: Pool) -> AsyncRetrying:
    # tenacity is imported on the first retry: most runs need none, and it is a tenth of the runner's start-up
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

    return AsyncRetrying(
        retry=retry_if_exception_type(errors.TransientError),
        wait=wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.initial_wait),
        stop=stop_after_attempt(policy.max_attempts),
        sleep=pool.pause,  # cut short when an outage ends: the engine is back, the line goes on
        reraise=True,
    )


def _work(result: Result) -> float:
    """What a request delivered, for the concurrency limiter: its completion tokens, else one request."""
    return float(result.timings.completion_tokens or 1)


def _engine_seconds(result: Result) -> float | None:
    """The seconds the engine says it worked on a request (load, prompt, generation); None where it does not tell
    (a wait for a slot is the rest of the latency: ``concurrency.queued``)."""
    t = result.timings
    if t.prompt_ms is None or t.decode_ms is None:
        return None
    return (t.prompt_ms + t.decode_ms + (t.load_ms or 0.0)) / 1000


async def _attempt(lease: Lease, job: Job, policy: RetryPolicy, stream: bool, attempts: int) -> Result:
    """One attempt on the leased host, bounded by the policy's timeout; the lease is released with its outcome."""
    try:
        async with asyncio.timeout(policy.timeout):
            result = await lease.host.backend.complete(job.url, job.body, num_ctx=job.num_ctx, stream=stream)
    except TimeoutError as exc:
        error: errors.BackendError = errors.BackendTimeout(
            f"No answer within {policy.timeout:g} s (attempt {attempts}).")
        error.host = lease.host.url
        lease.release(error=error)
        raise error from exc
    except errors.BackendError as exc:
        exc.host = lease.host.url
        lease.release(error=exc)
        raise
    except asyncio.CancelledError:
        lease.release()
        raise
    except Exception as exc:  # a backend bug must fail one line, not the batch
        error = translate(exc)
        error.host = lease.host.url
        lease.release(error=error)
        raise error from exc
    lease.release(work=_work(result), engine=_engine_seconds(result))
    result.host = lease.host.url
    return result


async def call_with_retries(pool: Pool, job: Job, policy: RetryPolicy, *, stream: bool = False,
                            model: str | None = None, first: Lease | None = None
                            ) -> tuple[Result | None, errors.BackendError | None, int]:
    """One job to its end: (result, None, attempts) or (None, final error, attempts).

    A line that asks for JSON (``obatch.structured``) has its answer checked: an answer that fails the check is
    asked for again, up to ``policy.output_retries`` times (a budget of its own, beside the transient faults'), and
    the line then ends as ``invalid_output`` with the last answer kept. A line that asks for no JSON is never checked.
    """
    try:
        expect = structured.expectation(job.url, job.body)
    except errors.PermanentError as exc:
        if first is not None:
            first.release()
        return None, exc, 0
    result, error, attempts = await _call_until_answered(pool, job, policy, stream, model, first)
    if expect is None:
        return result, error, attempts
    refused = 0
    while result is not None:
        why = structured.problem(expect, result.body)
        if why is None:
            result.refused = refused
            return result, None, attempts
        refused += 1
        if refused > policy.output_retries:
            return None, structured.invalid(why, result, refused, attempts), attempts
        result, error, more = await _call_until_answered(pool, job, policy, stream, model, None)
        attempts += more
    return None, error, attempts


async def _call_until_answered(pool: Pool, job: Job, policy: RetryPolicy, stream: bool, model: str | None,
                               first: Lease | None) -> tuple[Result | None, errors.BackendError | None, int]:
    """Attempts until the engine answers or a fault is final: (result, None, attempts) or (None, error, attempts).

    Each attempt leases a slot anew, so a retry may go to another host of the pool. The first attempt runs outside
    tenacity (most requests need no retry, and the retry machinery costs per call); a transient failure hands the
    job to tenacity's exponential backoff with jitter for the remaining attempts (a wait cut short when an
    outage of every host ends: ``Pool.pause``).
    """
    lease = first or await pool.lease(model)
    try:
        return await _attempt(lease, job, policy, stream, 1), None, 1
    except errors.PermanentError as exc:
        return None, exc, 1
    except errors.BackendError as exc:
        failed: errors.BackendError | None = exc
    attempts = 1
    try:
        async for attempt in _retrying(policy, pool):
            with attempt:
                if failed is not None:  # the fast path's failure is tenacity's first attempt: it decides the wait
                    error, failed = failed, None
                    raise error
                attempts += 1
                result = await _attempt(await pool.lease(model), job, policy, stream, attempts)
        return result, None, attempts
    except errors.BackendError as exc:
        return None, exc, attempts


SINK_BACKLOG = 256  # finished requests that may wait for the sink (the store) before no new one is started


async def run_jobs(jobs: AsyncIterator[Job] | JobSource, pool: Pool | Backend, sink: Sink, *, policy: RetryPolicy,
                   model: str | None = None, stream: bool = False, cap: int | None = None) -> None:
    """Run every job through ``pool``; hand each outcome to ``sink`` as it arrives.

    A job is taken from ``jobs`` only once a host has a free slot for it (a ``JobSource`` is told which host, and
    when each job has ended, before its outcome goes to the sink), so the hosts' levels (fixed or auto) bound
    the work in flight, and concurrent runs on one pool (a server's batches) are served first come first served.
    A request gives its slot back as soon as the engine has answered, and its outcome then waits for the sink; when
    the sink (the store) is slower than the engine, at most ``SINK_BACKLOG`` outcomes wait, and no new job starts
    until one is taken — back-pressure, so memory stays flat however fast the engine is. ``cap``, when given,
    bounds this run's own jobs (in flight and waiting) instead.
    """
    pool = Pool.of(pool)
    room = asyncio.Semaphore(cap or pool.ceiling(model) + SINK_BACKLOG)
    source = jobs if isinstance(jobs, JobSource) else InOrder(jobs)

    async def one(job: Job, lease: Lease) -> None:
        try:
            started = time.perf_counter()
            result, error, attempts = await call_with_retries(pool, job, policy, stream=stream, model=model,
                                                              first=lease)
            source.finished(job, result)  # at once: the slot it freed is the next line's of its group
            await sink(Outcome(job, result, error, (time.perf_counter() - started) * 1000, attempts, time.time()))
        finally:
            room.release()

    async with asyncio.TaskGroup() as group:
        while True:
            await room.acquire()
            try:
                lease = await pool.lease(model)
            except BaseException:
                room.release()
                raise
            try:
                job = await source.next(lease.host)
            except BaseException:
                lease.release()
                room.release()
                raise
            if job is None:
                lease.release()
                room.release()
                break
            group.create_task(one(job, lease))
