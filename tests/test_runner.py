"""The runner: transient faults retried with backoff, permanent ones not; bounded concurrency; prompt cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from obatch import errors
from obatch.backends.ollama import OllamaBackend
from obatch.runner import Job, Outcome, RetryPolicy, call_with_retries, run_jobs

POLICY = RetryPolicy(max_attempts=5, initial_wait=0.001, max_wait=0.01, timeout=1.0)
OK = {"model": "m", "message": {"role": "assistant", "content": "hi"}, "done": True, "done_reason": "stop",
      "prompt_eval_count": 3, "eval_count": 1}
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def backend_with(handler: Handler) -> OllamaBackend:
    return OllamaBackend("http://engine", transport=httpx.MockTransport(handler))


def job(i: int = 0) -> Job:
    return Job(i, f"r{i}", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})


def scripted(*answers: int | type[Exception]) -> tuple[Handler, list[int]]:
    """A handler answering each call with the next status (or raising the next exception); then 200."""
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        answer = answers[len(calls) - 1] if len(calls) <= len(answers) else 200
        if isinstance(answer, type):
            raise answer("boom", request=request)  # type: ignore[call-arg]
        if answer == 200:
            return httpx.Response(200, content=orjson.dumps(OK))
        return httpx.Response(answer, json={"error": f"status {answer}"})

    return handler, calls


@pytest.mark.parametrize("faults", [(503,), (500, 502), (httpx.ConnectError, httpx.ReadError, 503)])
async def test_transient_faults_are_retried_until_success(faults: tuple[int | type[Exception], ...]) -> None:
    handler, calls = scripted(*faults)
    backend = backend_with(handler)
    result, error, attempts = await call_with_retries(backend, job(), POLICY)
    await backend.aclose()
    assert error is None and result is not None and result.body["choices"][0]["message"]["content"] == "hi"
    assert attempts == len(calls) == len(faults) + 1


@pytest.mark.parametrize(("status", "kind"), [(400, errors.PermanentError), (404, errors.ModelNotFoundError),
                                              (422, errors.PermanentError)])
async def test_client_errors_are_never_retried(status: int, kind: type[errors.BackendError]) -> None:
    handler, calls = scripted(status)
    backend = backend_with(handler)
    result, error, attempts = await call_with_retries(backend, job(), POLICY)
    await backend.aclose()
    assert result is None and isinstance(error, kind) and attempts == 1 == len(calls)


async def test_retries_stop_after_max_attempts() -> None:
    handler, calls = scripted(*([503] * 20))
    backend = backend_with(handler)
    _, error, attempts = await call_with_retries(backend, job(), POLICY)
    await backend.aclose()
    assert isinstance(error, errors.ServerBusyError) and attempts == POLICY.max_attempts == len(calls)


async def test_a_hang_times_out_and_is_retried() -> None:
    hung: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hung.append(1)
        if len(hung) == 1:
            await asyncio.sleep(30)
        return httpx.Response(200, content=orjson.dumps(OK))

    backend = backend_with(handler)
    policy = RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.01, timeout=0.2)
    started = time.monotonic()
    result, error, attempts = await call_with_retries(backend, job(), policy)
    await backend.aclose()
    assert result is not None and error is None and attempts == 2
    assert time.monotonic() - started < 2


async def _jobs(n: int) -> AsyncIterator[Job]:
    for i in range(n):
        yield job(i)


async def test_concurrency_is_bounded_and_every_job_has_one_outcome() -> None:
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return httpx.Response(200, content=orjson.dumps(OK))

    outcomes: list[Outcome] = []

    async def sink(outcome: Outcome) -> None:
        outcomes.append(outcome)

    backend = backend_with(handler)
    await run_jobs(_jobs(60), backend, sink, concurrency=4, policy=POLICY)
    await backend.aclose()
    assert peak == 4
    assert sorted(o.job.line for o in outcomes) == list(range(60))


async def test_cancel_stops_promptly() -> None:
    started: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        started.append(1)
        await asyncio.sleep(60)
        return httpx.Response(200, content=orjson.dumps(OK))

    async def sink(outcome: Outcome) -> None:
        raise AssertionError("no job can finish")

    backend = backend_with(handler)
    task = asyncio.create_task(run_jobs(_jobs(100), backend, sink, concurrency=3, policy=POLICY))
    await asyncio.sleep(0.1)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await backend.aclose()
    assert time.monotonic() - began < 0.5
    assert len(started) == 3


def test_status_classification() -> None:
    assert isinstance(errors.from_status(503, "server busy"), errors.ServerBusyError)
    assert isinstance(errors.from_status(500, "x"), errors.TransientError)
    assert isinstance(errors.from_status(404, "x"), errors.ModelNotFoundError)
    assert isinstance(errors.from_status(400, "prompt exceeds context length"), errors.ContextLengthError)
    assert not isinstance(errors.from_status(400, "bad"), errors.TransientError)
