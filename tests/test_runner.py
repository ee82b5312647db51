"""The runner: transient faults retried with backoff, permanent ones not; bounded concurrency; prompt cancel.

The engine is a real aiohttp server on loopback whose handler each test scripts (answers, delays, dropped
connections), so the backend's own HTTP client and error translation are exercised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from obatch import errors
from obatch.backends.ollama import OllamaBackend
from obatch.backends.pool import Pool, fixed
from obatch.runner import Job, Outcome, RetryPolicy, call_with_retries, run_jobs

POLICY = RetryPolicy(max_attempts=5, initial_wait=0.001, max_wait=0.01, timeout=1.0)
OK = {"model": "m", "message": {"role": "assistant", "content": "hi"}, "done": True, "done_reason": "stop",
      "prompt_eval_count": 3, "eval_count": 1}
RESET = "reset"  # a scripted answer: drop the connection without answering
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Engine:
    """A scripted engine on loopback; ``async with Engine(handler) as pool`` gives a one-host pool of it."""

    def __init__(self, handler: Handler, level: int = 4) -> None:
        self.handler, self.level = handler, level
        self.runner: web.AppRunner | None = None
        self.backend: OllamaBackend | None = None

    async def __aenter__(self) -> Pool:
        app = web.Application()
        app.router.add_post("/api/chat", self.handler)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.backend = OllamaBackend(f"http://127.0.0.1:{port}")
        return fixed(self.backend, self.level)

    async def __aexit__(self, *exc: object) -> None:
        assert self.backend is not None and self.runner is not None
        await self.backend.aclose()
        await self.runner.cleanup()


def ok() -> web.Response:
    return web.Response(body=orjson.dumps(OK), content_type="application/json")


def drop(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


def job(i: int = 0) -> Job:
    return Job(i, f"r{i}", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})


def scripted(*answers: int | str) -> tuple[Handler, list[int]]:
    """A handler answering each call with the next status (or dropping the connection); then 200."""
    calls: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        answer = answers[len(calls) - 1] if len(calls) <= len(answers) else 200
        if answer == RESET:
            return drop(request)
        if answer == 200:
            return ok()
        return web.json_response({"error": f"status {answer}"}, status=int(answer))

    return handler, calls


@pytest.mark.parametrize("faults", [(503,), (500, 502), (RESET, RESET, 503)])
async def test_transient_faults_are_retried_until_success(faults: tuple[int | str, ...]) -> None:
    handler, calls = scripted(*faults)
    async with Engine(handler) as pool:
        result, error, attempts = await call_with_retries(pool, job(), POLICY)
    assert error is None and result is not None and result.body["choices"][0]["message"]["content"] == "hi"
    assert attempts == len(calls) == len(faults) + 1


@pytest.mark.parametrize(("status", "kind"), [(400, errors.PermanentError), (404, errors.ModelNotFoundError),
                                              (422, errors.PermanentError)])
async def test_client_errors_are_never_retried(status: int, kind: type[errors.BackendError]) -> None:
    handler, calls = scripted(status)
    async with Engine(handler) as pool:
        result, error, attempts = await call_with_retries(pool, job(), POLICY)
    assert result is None and isinstance(error, kind) and attempts == 1 == len(calls)


async def test_retries_stop_after_max_attempts() -> None:
    handler, calls = scripted(*([503] * 20))
    async with Engine(handler) as pool:
        _, error, attempts = await call_with_retries(pool, job(), POLICY)
    assert isinstance(error, errors.ServerBusyError) and attempts == POLICY.max_attempts == len(calls)


async def test_a_hang_times_out_and_is_retried() -> None:
    hung: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        hung.append(1)
        if len(hung) == 1:
            await asyncio.sleep(30)
        return ok()

    policy = RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.01, timeout=0.2)
    started = time.monotonic()
    async with Engine(handler) as pool:
        result, error, attempts = await call_with_retries(pool, job(), policy)
        assert time.monotonic() - started < 2
    assert result is not None and error is None and attempts == 2


async def _jobs(n: int) -> AsyncIterator[Job]:
    for i in range(n):
        yield job(i)


async def test_concurrency_is_bounded_and_every_job_has_one_outcome() -> None:
    in_flight, peak = 0, 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return ok()

    outcomes: list[Outcome] = []

    async def sink(outcome: Outcome) -> None:
        outcomes.append(outcome)

    async with Engine(handler, level=4) as pool:
        await run_jobs(_jobs(60), pool, sink, policy=POLICY)
    assert peak == 4
    assert sorted(o.job.line for o in outcomes) == list(range(60))


async def test_cancel_stops_promptly() -> None:
    started: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        started.append(1)
        await asyncio.sleep(60)
        return ok()

    async def sink(outcome: Outcome) -> None:
        raise AssertionError("no job can finish")

    async with Engine(handler, level=3) as pool:
        task = asyncio.create_task(run_jobs(_jobs(100), pool, sink, policy=POLICY))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - began < 0.5
        assert len(started) == 3
        assert pool.hosts[0].inflight == 0  # every slot the cancelled run held was given back


def test_status_classification() -> None:
    assert isinstance(errors.from_status(503, "server busy"), errors.ServerBusyError)
    assert isinstance(errors.from_status(500, "x"), errors.TransientError)
    assert isinstance(errors.from_status(404, "x"), errors.ModelNotFoundError)
    assert isinstance(errors.from_status(400, "prompt exceeds context length"), errors.ContextLengthError)
    assert not isinstance(errors.from_status(400, "bad"), errors.TransientError)


async def test_a_slow_sink_holds_back_new_work() -> None:
    """The engine answers at once, the sink (the store) is slow: outcomes waiting for it stay bounded, so memory
    does not grow with the batch."""
    from obatch.runner import SINK_BACKLOG

    async def handler(request: web.Request) -> web.StreamResponse:
        return ok()

    waiting, most = 0, 0
    lock = asyncio.Lock()

    async def sink(outcome: Outcome) -> None:
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        async with lock:
            await asyncio.sleep(0.001)
        waiting -= 1

    async with Engine(handler, level=4) as pool:
        await run_jobs(_jobs(SINK_BACKLOG * 3), pool, sink, policy=POLICY)
    assert most <= SINK_BACKLOG + 4
