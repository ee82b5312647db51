"""The scheduler: one shared queue, N workers, retries for transient faults only, a batching result sink.

Work is pulled from one queue (no fixed chunks: a slow request never idles the other workers). Each attempt is
bounded by a timeout; transient faults (``TransientError``: 503 busy, 5xx, connection faults, timeouts) are retried
with exponential backoff and jitter through tenacity; anything else fails the line at once. Every job yields
exactly one ``Outcome``. Cancelling the task that awaits ``run_jobs`` stops the workers promptly; outcomes already
handed to the sink are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from obatch import errors
from obatch.backends.base import Backend, Result, translate

if TYPE_CHECKING:
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

    @classmethod
    def from_settings(cls, settings: Settings, *, max_attempts: int | None = None) -> RetryPolicy:
        """The policy the settings describe; ``max_attempts`` caps their attempts (a benchmark retries less)."""
        attempts = settings.max_attempts if max_attempts is None else min(settings.max_attempts, max_attempts)
        return cls(max_attempts=attempts, initial_wait=settings.retry_initial_wait, max_wait=settings.retry_max_wait,
                   timeout=settings.request_timeout)


Sink = Callable[[Outcome], Awaitable[None]]


async def call_with_retries(backend: Backend, job: Job, policy: RetryPolicy, *, stream: bool = False
                            ) -> tuple[Result | None, errors.BackendError | None, int]:
    """One job through the backend: (result, None, attempts) or (None, final error, attempts)."""
    attempts = 0
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors.TransientError),
        wait=wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.initial_wait),
        stop=stop_after_attempt(policy.max_attempts),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                try:
                    async with asyncio.timeout(policy.timeout):
                        result = await backend.complete(job.url, job.body, num_ctx=job.num_ctx, stream=stream)
                except TimeoutError as exc:
                    raise errors.BackendTimeout(
                        f"No answer within {policy.timeout:g} s (attempt {attempts}).") from exc
                except errors.BackendError:
                    raise
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a backend bug must fail one line, not the batch
                    raise translate(exc) from exc
        return result, None, attempts
    except errors.BackendError as exc:
        return None, exc, attempts


async def run_jobs(jobs: AsyncIterator[Job], backend: Backend, sink: Sink, *, concurrency: int,
                   policy: RetryPolicy, stream: bool = False, slots: asyncio.Semaphore | None = None) -> None:
    """Run every job with at most ``concurrency`` in flight; hand each outcome to ``sink`` as it arrives.

    ``slots``, when given, is shared by several runs (a server's batches): each request also takes one of its
    permits, and since waiters are served first come first served, concurrent batches share the engine fairly.
    """
    queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=concurrency * 2)

    async def produce() -> None:
        async for job in jobs:
            await queue.put(job)
        for _ in range(concurrency):
            await queue.put(None)

    async def work() -> None:
        while (job := await queue.get()) is not None:
            started = time.perf_counter()
            if slots is None:
                result, error, attempts = await call_with_retries(backend, job, policy, stream=stream)
            else:
                async with slots:
                    result, error, attempts = await call_with_retries(backend, job, policy, stream=stream)
            await sink(Outcome(job, result, error, (time.perf_counter() - started) * 1000, attempts, time.time()))

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        for _ in range(concurrency):
            group.create_task(work())
