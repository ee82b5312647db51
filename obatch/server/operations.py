"""What each endpoint does, on top of the core (``obatch.batches``, ``obatch.store.repo``), returning wire models.

Controllers call one of these per route. ``owner`` is the caller's owner id, or None when authentication is off
(then everything is visible, and new objects are stored with the empty owner, like the CLI's).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import batches, errors
from obatch.backends import responses
from obatch.backends.base import with_trained_context
from obatch.batches import Services, reading, retry
from obatch.batches.services import update_batch
from obatch.jsonl import EnginePolicy, check_line, model_problem
from obatch.protocol import (
    BackendHealth,
    Batch,
    DeadlinePlan,
    FileObject,
    Health,
    HostStatus,
    ListPage,
    Model,
    ModelList,
    endpoint_problem,
)
from obatch.store import chains, repo
from obatch.store.tables import BatchRow, FileRow
from obatch.worker import BatchWorker

METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
SHOW_TIMEOUT = 5.0  # seconds for the engine to describe one model (/v1/models asks it a model's trained context)


class BatchCreate(BaseModel):
    """``POST /v1/batches``: OpenAI's fields, and obatch's ``model`` (one model for every line), ``concurrency``
    (at most this many of the batch's requests in flight; the server's slots bound all batches together) and
    ``schedule`` (``"file"``: the lines in the file's order; ``"auto"``, the server's default: ``obatch.schedule``)."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    model: str | None = None
    concurrency: int | None = Field(default=None, ge=1, le=1024)  # obatch's: requests in flight for this batch
    schedule: Literal["auto", "file"] | None = None  # obatch's: the order its lines run in
    output_expires_after: dict[str, Any] | None = None  # {anchor: "created_at", seconds}: output/error files


def _page(items: list[Any], has_more: bool) -> ListPage:
    return ListPage(data=items, first_id=items[0].id if items else None, last_id=items[-1].id if items else None,
                    has_more=has_more)


# ---------------------------------------------------------------------------------------------- files


async def list_files(svc: Services, owner: str | None, *, after: str | None, limit: int, purpose: str | None,
                     order: str) -> ListPage:
    async with svc.sessions() as session:
        rows, more = await repo.list_files(session, owner=owner, after=after, limit=limit, purpose=purpose,
                                           ascending=order == "asc")
    now = svc.clock()  # an expired file is gone for its owner at once, before the sweep deletes it
    return _page([batches.file_object(r) for r in rows if r.expires_at is None or r.expires_at > now], more)


async def _live_file(svc: Services, owner: str | None, file_id: str) -> Any:
    """A file row, or 404 once it has expired (also before the sweep has deleted it)."""
    async with svc.sessions() as session:
        row = await repo.get_file(session, file_id, owner)
    if row.expires_at is not None and row.expires_at <= svc.clock():
        raise errors.NotFoundError(f"No such file: {file_id}", param="file_id")
    return row


async def get_file(svc: Services, owner: str | None, file_id: str) -> FileObject:
    return batches.file_object(await _live_file(svc, owner, file_id))


async def file_content(svc: Services, owner: str | None, file_id: str) -> tuple[AsyncIterator[bytes], int]:
    """The stored bytes as a chunk stream, and their size (404 for another owner's file or a missing one)."""
    row = await _live_file(svc, owner, file_id)
    path = batches.file_path(svc.settings, row.id)
    if not await asyncio.to_thread(path.is_file):
        raise errors.NotFoundError(f"The content of file {file_id} is gone.", param="file_id")
    return batches.read_chunks(path), row.bytes


async def delete_file(svc: Services, owner: str | None, file_id: str) -> dict[str, Any]:
    await batches.delete_file(svc, file_id, owner)
    return {"id": file_id, "object": "file", "deleted": True}


# -------------------------------------------------------------------------------------------- batches


def _check_create(svc: Services, request: BatchCreate) -> None:
    batches.window_seconds(request.completion_window, minimum=svc.settings.min_completion_window)
    problem = endpoint_problem(request.endpoint)
    if problem is not None:
        raise errors.ConfigError(problem, code="unsupported_endpoint", param="endpoint")
    if request.model is not None:
        why = model_problem(request.model) if request.model else "must not be empty"
        if why:
            raise errors.ConfigError(f"model {why}.", code="invalid_value", param="model")
    metadata = request.metadata or {}
    if len(metadata) > METADATA_PAIRS or any(len(k) > METADATA_KEY or len(v) > METADATA_VALUE
                                             for k, v in metadata.items()):
        raise errors.ConfigError(f"metadata holds at most {METADATA_PAIRS} pairs, keys of at most {METADATA_KEY} "
                                 f"and values of at most {METADATA_VALUE} characters.",
                                 code="invalid_value", param="metadata")


OUTPUT_RETRIES_KEY = "obatch_output_retries"  # batch metadata: answers refused by the JSON check asked again


def output_retries(metadata: dict[str, str] | None) -> int | None:
    """The batch's ``obatch_output_retries`` metadata value (None: the server's setting); a bad one is refused."""
    value = (metadata or {}).get(OUTPUT_RETRIES_KEY)
    if value is None:
        return None
    if not value.isdigit() or int(value) > 20:
        raise errors.ConfigError(f"metadata {OUTPUT_RETRIES_KEY} must be a whole number from 0 to 20; got "
                                 f"{value[:32]!r}.", code="invalid_value", param="metadata")
    return int(value)


async def create_batch(svc: Services, worker: BatchWorker, owner: str | None, request: BatchCreate) -> Batch:
    """Record the batch (``validating``) and wake the worker; validation and the run happen there."""
    _check_create(svc, request)
    retries = output_retries(request.metadata)
    expires = batches.expiry_seconds(request.output_expires_after, param="output_expires_after",
                                     minimum=svc.settings.min_file_expiry)
    async with svc.sessions() as session:
        source = await repo.get_file(session, request.input_file_id, owner)
    if source.purpose != "batch":
        raise errors.ConfigError(f"File {source.id} has purpose {source.purpose!r}; a batch input needs 'batch'.",
                                 code="invalid_value", param="input_file_id")
    made = await _plan(svc, source, request)
    row = await batches.create_batch(svc, input_file_id=source.id, endpoint=request.endpoint,
                                     completion_window=request.completion_window, metadata=request.metadata,
                                     owner=source.owner, model=request.model, source="api",
                                     concurrency=request.concurrency, output_expires_after=expires,
                                     output_retries=retries, schedule=request.schedule)
    await update_batch(svc, row, plan_json=made.model_dump_json())
    worker.kick()
    return batches.batch_object(row)


async def _plan(svc: Services, source: FileRow, request: BatchCreate) -> DeadlinePlan:
    """The batch's estimate against its completion_window (``obatch.bench.estimate.deadline``); with the metadata
    key ``obatch_strict_window`` "true", a batch whose estimate's lower bound is past its window is refused."""
    from obatch.bench.estimate import deadline

    strict = deadline.strict(request.metadata)
    made = await deadline.plan_batch(svc, source, request.completion_window, model=request.model,
                                     concurrency=request.concurrency or svc.pool.fixed,
                                     schedule=request.schedule or svc.settings.schedule)
    if strict:
        deadline.refuse_if_certain(made)
    return made


async def _wire(session: AsyncSession, rows: list[BatchRow]) -> list[Batch]:
    """Batch objects, with the count of lines that never ran on those cancelled or expired, and the retries made
    of each (a query each)."""
    stopped = [r.id for r in rows if r.status in batches.NOT_RUN_STATUSES]
    not_run = await repo.not_run_counts(session, stopped)
    retries = await chains.retry_ids(session, [r.id for r in rows])
    return [batches.batch_object(r, not_run=not_run.get(r.id, 0) if r.id in stopped else None,
                                 retries=retries.get(r.id)) for r in rows]


async def get_batch(svc: Services, owner: str | None, batch_id: str) -> Batch:
    async with svc.sessions() as session:
        return (await _wire(session, [await repo.get_batch(session, batch_id, owner)]))[0]


async def list_batches(svc: Services, owner: str | None, *, after: str | None, limit: int) -> ListPage:
    async with svc.sessions() as session:
        rows, more = await repo.list_batches(session, owner=owner, after=after, limit=limit)
        return _page(await _wire(session, rows), more)


async def cancel_batch(svc: Services, owner: str | None, batch_id: str) -> Batch:
    row = await batches.request_cancel(svc, batch_id, owner)
    async with svc.sessions() as session:
        return (await _wire(session, [row]))[0]


class BatchRetry(BaseModel):
    """``POST /v1/batches/{id}/retry`` (obatch's): ``codes``, the error codes to retry instead of those a retry can
    change (engine errors, timeouts, lines left unrun)."""

    model_config = ConfigDict(extra="forbid")

    codes: list[str] | None = Field(default=None, min_length=1, max_length=retry.MAX_CODES)


async def retry_batch(svc: Services, worker: BatchWorker, owner: str | None, batch_id: str,
                      request: BatchRetry | None) -> Batch:
    """A new batch of the chain's lines that failed for reasons a retry can change, made from ``batch_id``."""
    row = await retry.create_retry(svc, batch_id, owner=owner, codes=request.codes if request else None)
    worker.kick()
    async with svc.sessions() as session:
        return (await _wire(session, [row]))[0]


async def batch_results(svc: Services, owner: str | None, batch_id: str, *, after: int, limit: int,
                        merged: bool) -> reading.ResultsPage:
    """A page of a batch's finished lines after line ``after``, in input order (the output files' bytes)."""
    return await reading.read_page(svc.sessions, batch_id, data_dir=svc.settings.data_dir, owner=owner, after=after,
                                   limit=limit, merged=merged)


# ---------------------------------------------------------------------------------------- pass-through


def _checked(svc: Services, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request body, validated with the same rules as a batch line (400 otherwise)."""
    if not body.get("model") and svc.settings.default_model:
        body["model"] = svc.settings.default_model
    item = check_line(1, {"custom_id": "request", "method": "POST", "url": url, "body": body},
                      policy=EnginePolicy.from_settings(svc.settings))
    if isinstance(item, errors.LineProblem):
        param = item.param.removeprefix("body.") if item.param else None
        raise errors.ConfigError(item.message.replace("body.", ""), code=item.code, param=param)
    return item.body


async def _answer(svc: Services, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        async with asyncio.timeout(svc.settings.request_timeout):
            return (await svc.backend.complete(url, body)).body
    except TimeoutError as exc:
        raise errors.BackendTimeout(f"The engine did not answer within {svc.settings.request_timeout:g} s.") from exc


async def complete(svc: Services, url: str, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[bytes]:
    """One request to the engine; with ``stream: true`` (chat, completions, responses) an SSE byte stream."""
    body = _checked(svc, url, body)
    if url == "/v1/responses" and body.get("background"):
        raise errors.ConfigError("background responses are not supported: send them as a batch with endpoint "
                                 "/v1/responses.", param="background")
    if not body.get("stream"):
        return await _answer(svc, url, body)
    if url == "/v1/chat/completions":
        return _streamed(await _opened(svc.backend.stream_chat(body)), _data, done=_DONE)
    if url == "/v1/completions":
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return _streamed(await _opened(svc.backend.stream_completion(body)),
                         lambda chunk: _data(chunk) if usage or chunk.get("choices") else None, done=_DONE)
    if url == "/v1/responses":
        chat = await _opened(svc.backend.stream_chat(responses.to_chat(body)))
        return _streamed(responses.stream_from_chat(chat, body), _event, error=_error_event, also=chat)
    raise errors.ConfigError(f"stream is not supported on {url}.", param="stream")


async def embeddings(svc: Services, body: dict[str, Any]) -> dict[str, Any]:
    body = _checked(svc, "/v1/embeddings", body)
    if body.get("stream"):
        raise errors.ConfigError("stream is not supported on /v1/embeddings.", param="stream")
    return await _answer(svc, "/v1/embeddings", body)


_DONE = b"data: [DONE]\n\n"


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _event(event: dict[str, Any]) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _error_data(exc: errors.ObatchError, _sent: dict[str, Any] | None) -> bytes:
    return _data({"error": {"message": exc.message, "type": "server_error", "param": exc.param, "code": exc.code}})


def _error_event(exc: errors.ObatchError, sent: dict[str, Any] | None) -> bytes:
    number = int((sent or {}).get("sequence_number", -1)) + 1
    return _event({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                   "sequence_number": number})


async def _opened(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """``chunks`` with the first one already awaited, so that an engine error (an unknown model, a refused option)
    is an HTTP error rather than a stream that fails at once."""
    try:
        first: dict[str, Any] | None = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise

    async def rest() -> AsyncIterator[dict[str, Any]]:
        try:
            if first is not None:
                yield first
                async for chunk in chunks:
                    yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return rest()


def _streamed(items: AsyncIterator[dict[str, Any]], frame: Callable[[dict[str, Any]], bytes | None], *,
              done: bytes = b"", error: Callable[[errors.ObatchError, dict[str, Any] | None], bytes] = _error_data,
              also: AsyncIterator[dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
    """An SSE answer: each item as ``frame`` makes it (None skips it), then ``done``. An error after the answer
    has begun is sent as its last event (which the OpenAI SDK raises). When the stream ends, also because the
    client went away, ``items`` (and ``also``, the stream it reads) are closed, which ends the engine request."""

    async def events() -> AsyncIterator[bytes]:
        sent: dict[str, Any] | None = None
        try:
            async for item in items:
                if (framed := frame(item)) is not None:
                    sent = item
                    yield framed
            if done:
                yield done
        except errors.ObatchError as exc:
            yield error(exc, sent)
        finally:
            await items.aclose()  # type: ignore[attr-defined]
            if also is not None:
                await also.aclose()  # type: ignore[attr-defined]

    return events()


async def models(svc: Services, probe: BackendProbe | None = None) -> ModelList:
    """The backend's models; with a probe that finds the backend down, that answer at once (a hung engine would
    hold the request for the engine client's whole timeout). A trained context the listing leaves out (Ollama's
    ``/api/tags`` has none) is asked of the engine (``show``: ``/api/show``, which the backend caches)."""
    if probe is not None and not (state := await probe.report())["reachable"]:
        raise errors.TransientError(f"The backend does not answer: {state['error']}.")
    listed = await svc.backend.models()
    described = await asyncio.gather(*(with_trained_context(svc.backend, m, within=SHOW_TIMEOUT) for m in listed))
    return ModelList(data=[m.as_openai() for m in described])


async def model(svc: Services, model_id: str) -> Model:
    return (await svc.backend.show(model_id)).as_openai()


# ------------------------------------------------------------------------------------------------ health


def describe_failure(exc: BaseException, where: str, timeout: float) -> str:
    """What happened, in words a person can act on ("connection refused at http://…"), not an exception's name."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError | errors.BackendTimeout):
            return f"no answer from {where} within {timeout:g} s"
        if isinstance(seen, socket.gaierror):
            return f"cannot resolve the host of {where}"
        if isinstance(seen, OSError) and seen.errno == errno.ECONNREFUSED:
            return f"connection refused at {where}"
        seen = seen.__cause__ or seen.__context__
    return f"{getattr(exc, 'message', None) or exc or type(exc).__name__} ({where})"


class BackendProbe:
    """The backend's reachability for ``/health``, without making every ``/health`` (and so every UI page) wait
    on a hung engine: a probe runs at most every ``fresh`` seconds, and a caller waits for a running probe only
    ``grace`` seconds, then gets the last answer while the probe finishes in the background."""

    def __init__(self, backend: Any, where: str, *, timeout: float = 3.0, grace: float = 0.3,
                 fresh: float = 2.0) -> None:
        self.backend, self.where, self.timeout, self.grace, self.fresh = backend, where, timeout, grace, fresh
        self._task: asyncio.Task[dict[str, Any]] | None = None
        self._started = 0.0
        self._last: dict[str, Any] | None = None

    async def report(self) -> dict[str, Any]:
        """``{"reachable": bool, "version" | "error": ...}``; ``"asking": True`` while the first probe has not
        answered."""
        if self._task is None or (self._task.done() and time.monotonic() - self._started >= self.fresh):
            self._started = time.monotonic()
            self._task = asyncio.create_task(self._probe(), name="obatch-health-probe")
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._task), self.grace)
        return self._last or {"reachable": False, "asking": True,
                              "error": f"no answer from {self.where} yet (waited {self.grace:g} s; still asking)"}

    async def _probe(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                version = await self.backend.version()
            self._last = {"reachable": True, "version": version}
        except Exception as exc:
            self._last = {"reachable": False, "error": describe_failure(exc, self.where, self.timeout)}
        return self._last

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def health(svc: Services, worker: BatchWorker | None = None, probe: BackendProbe | None = None) -> Health:
    """The store must answer (``error`` otherwise); the backend's reachability is reported (not fatal: an engine
    that is still starting makes the server ``degraded``, not unhealthy)."""
    db = "ok"
    try:
        async with asyncio.timeout(5), svc.sessions() as session:
            await repo.ping(session)
    except Exception as exc:
        db = f"unreachable: {type(exc).__name__}"
    # Each engine host: state, concurrency and why, models — as the batches see them (the worker may run its own
    # pool on its own loop or in its own process, where the levels are learned).
    if worker is not None:
        await worker.refresh()
    hosts = (worker.describe() if worker is not None else None) or svc.pool.describe()
    backend = await (probe or BackendProbe(svc.backend, ", ".join(h["url"] for h in hosts))).report()
    if not backend["reachable"] and not backend.pop("asking", False):
        # no host answered the probe just now, whatever the batches saw last (a probe still asking says nothing yet)
        hosts = [h | {"state": "down", "error": backend["error"]} for h in hosts]
    status = "error" if db != "ok" else "ok" if backend["reachable"] else "degraded"
    return Health(status=status, db=db, backend=BackendHealth(
        name=svc.backend.name, **backend, urls=[h["url"] for h in hosts],
        hosts=[HostStatus.model_validate(h) for h in hosts]))
