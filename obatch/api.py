"""The notebook and CLI door into the batch engine: ``await obatch.run(...)`` → a polars DataFrame.

A run is a batch like any other: its input is stored, one row per request is kept in the store, and results are
written as they arrive. Running the same input with the same options again resumes an unfinished run instead of
starting over (a kernel restart or a killed process loses no finished request).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson

from obatch import _loop, errors
from obatch.backends import Backend, open_backend
from obatch.batches import (
    Services,
    compact,
    create_batch,
    file_path,
    process,
    provenance,
    read_chunks,
    reading,
    store_file,
    window_seconds,
    write_results,
)
from obatch.batches.retry import create_retry, unfinished_retry
from obatch.batches.services import update_batch
from obatch.cache import POLICIES, CachePolicy
from obatch.concurrency import Concurrency
from obatch.config import Schedule, Settings
from obatch.jsonl import summarise
from obatch.lease import BatchBusy
from obatch.progress import progress_bar
from obatch.protocol import NOT_RUN_CODES, DeadlinePlan, Endpoint, RequestLine
from obatch.store import repo
from obatch.store.db import open_store
from obatch.store.tables import BatchRow, FileRow

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("obatch.api")
T = TypeVar("T")

RequestsInput = str | Path | Iterable[Mapping[str, Any] | str]

# polars is imported where a frame is made: `obatch run` without --show needs none, and it is a third of start-up.
RESULT_SCHEMA = {
    "line": "Int64", "custom_id": "Utf8", "model": "Utf8", "status": "Utf8", "status_code": "Int64",
    "content": "Utf8", "finish_reason": "Utf8", "prompt_tokens": "Int64", "completion_tokens": "Int64",
    "latency_ms": "Float64", "ttft_ms": "Float64", "num_ctx": "Int64", "truncated": "Boolean",
    "attempts": "Int64", "error_code": "Utf8", "error_message": "Utf8",
    # provenance (docs/usage.md): the context loaded, the seed, answers the JSON check refused, and where it ran
    "loaded_context": "Int64", "seed": "Int64", "refused_answers": "Int64", "host": "Utf8", "engine": "Utf8",
    "engine_version": "Utf8", "model_digest": "Utf8",
    # a reused answer: the line it was taken from (a struct of CACHED_FROM), null for a line an engine answered
    "cached_from": "Struct",
}
"""One row per request: the notebook API's frame (from the store) and the UI's (from the output files) alike."""
CACHED_FROM = ("batch_id", "custom_id")
_COLUMNS = ("line", "custom_id", "model", "state", "status_code", "content", "finish_reason", "prompt_tokens",
            "completion_tokens", "latency_ms", "ttft_ms", "num_ctx", "truncated", "attempts", "error_code",
            "error_message", "loaded_context", "seed", "refused", "cached_from",
            "host")  # RESULT_SCHEMA's, as the store's request rows name them; the host's number becomes its facts


@dataclass
class RunReport:
    """What a finished run produced, and where."""

    batch: BatchRow
    output: Path
    errors: Path
    seconds: float

    @property
    def summary(self) -> str:
        b = self.batch
        rate = b.completed / self.seconds if self.seconds else 0.0
        text = (f"{b.id}: {b.status}; {b.completed} succeeded, {b.failed} failed of {b.total} "
                f"in {self.seconds:.1f} s ({rate:.2f} req/s; {b.input_tokens} prompt + {b.output_tokens} "
                f"completion tokens)\n  results: {self.output}\n  errors:  {self.errors}")
        if b.estimate_json and b.run_seconds > 0:  # the estimate made at the start, against what happened
            made = orjson.loads(b.estimate_json)
            text += (f"\n  estimate: {made['seconds']:.1f} s [{made['low']:.1f}, {made['high']:.1f}] for "
                     f"{b.run_seconds:.1f} s of running ({(made['seconds'] / b.run_seconds - 1) * 100:+.1f}%)")
        if b.plan_json:  # the estimate at creation against the window
            text += f"\n  completion window: {orjson.loads(b.plan_json)['message']}"
        return text


def _as_lines(requests: Iterable[Mapping[str, Any] | str], model: str | None, endpoint: str,
              defaults: Mapping[str, Any]) -> Iterable[bytes]:
    """Notebook inputs → batch lines: bare prompts become requests of ``endpoint``; ``defaults`` fill body fields
    (max_tokens, temperature…) that a request does not set itself."""
    for i, item in enumerate(requests):
        if isinstance(item, str):
            if endpoint == "/v1/embeddings":
                body: dict[str, Any] = {"input": item}
            elif endpoint == "/v1/completions":
                body = {"prompt": item}
            elif endpoint == "/v1/responses":
                body = {"input": item}
            else:
                body = {"messages": [{"role": "user", "content": item}]}
            if model:
                body["model"] = model
            # Not validated here: the file's validation reports a bad endpoint or body with its line, like any other.
            item = RequestLine.model_construct(custom_id=f"request-{i}", method="POST",
                                               url=cast(Endpoint, endpoint), body=body).model_dump()
        line = dict(item)
        if defaults and isinstance(line.get("body"), dict):
            line["body"] = {**defaults, **line["body"]}
        yield orjson.dumps(line) + b"\n"


async def _iterate(lines: Iterable[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def run_batch_file(
    requests: RequestsInput, *, settings: Settings | None = None, backend: Backend | None = None,
    model: str | None = None, concurrency: Concurrency | None = None, output: Path | None = None,
    errors_path: Path | None = None, endpoint: str = "/v1/chat/completions", progress: bool = True,
    source: str = "cli", fresh: bool = False, stream: bool = False, defaults: Mapping[str, Any] | None = None,
    output_retries: int | None = None, cache: CachePolicy | None = None,
    schedule: Schedule | None = None, completion_window: str | None = None, strict_window: bool = False,
) -> RunReport:
    """Run a batch file (or a list of requests or prompts) to the end; resume an unfinished identical run.

    ``concurrency`` is a number of requests in flight per engine host, or ``"auto"`` (the default) to find each
    host's best level by measuring. ``output_retries``: how often a line that asks for JSON is asked again when its
    answer is not that JSON (default: the ``output_retries`` setting). ``cache`` (default: ``settings.cache``) is the
    response cache's policy: ``"auto"``, ``"off"`` or ``"all"`` (docs/cache.md). ``schedule`` is the order the lines
    run in: ``"auto"`` (the default: lines that share a prompt prefix kept on one engine slot, the longest first;
    ``obatch.schedule``) or ``"file"``. ``completion_window`` (``"30m"``, ``"2h"``; default 7 days): the batch's
    window, which its estimate is compared with before it starts (``obatch.bench.estimate.deadline``: a warning
    when it is expected to miss it, by how much, and what would meet it; the plan is on the batch and its
    summary); ``strict_window`` refuses a batch whose estimate's lower bound is past the window."""
    settings = settings or Settings()
    if completion_window is not None:
        window_seconds(completion_window, minimum=settings.min_completion_window)
    elif strict_window:
        raise errors.ConfigError("strict_window compares the estimate with a completion_window: give one.",
                                 param="completion_window")
    if schedule is not None:
        if schedule not in ("auto", "file"):
            raise errors.ConfigError(f"schedule must be 'auto' or 'file', got {schedule!r}.", param="schedule")
        settings = settings.model_copy(update={"schedule": schedule})
    if cache is not None:
        if cache not in POLICIES:
            raise errors.ConfigError(f"cache must be one of {', '.join(POLICIES)}; got {cache!r}.", param="cache")
        settings = settings.model_copy(update={"cache": cache})
    async with _services(settings, backend, concurrency) as svc:
        sessions = svc.sessions
        if isinstance(requests, str | Path):
            path = Path(requests)
            if not await asyncio.to_thread(path.exists):
                raise errors.ConfigError(f"No such input file: {path}")
            chunks: AsyncIterator[bytes] = read_chunks(path)
            filename = path.name
        else:
            path = None
            chunks = _iterate(_as_lines(requests, model, endpoint, defaults or {}))
            filename = "requests.jsonl"
        stored = await store_file(svc, chunks, filename=filename, purpose="batch")
        stored_path = file_path(svc.settings, stored.id)
        signature = hashlib.sha256(
            f"{stored.sha256}|{model}|{svc.backend.name}|{source}".encode()).hexdigest()
        async with sessions() as session:
            batch = None if fresh else await repo.find_resumable(session, signature)
        if batch is None:
            made = await _plan(svc, stored, completion_window, model=model, strict=strict_window) \
                if completion_window is not None else None
            batch = await create_batch(svc, input_file_id=stored.id, endpoint=None,
                                       completion_window=completion_window or "7d", model=model, source=source,
                                       signature=signature, output_retries=output_retries,
                                       schedule=svc.settings.schedule)
            if made is not None:
                await update_batch(svc, batch, plan_json=made.model_dump_json())
        else:
            if batch.schedule != svc.settings.schedule:  # a resumed run goes on in the order asked now
                await update_batch(svc, batch, schedule=svc.settings.schedule)
            await asyncio.to_thread(stored_path.unlink, missing_ok=True)
            async with sessions() as session:
                await repo.delete_file(session, stored.id)
                await session.commit()
        return await _drive(svc, batch, output=output, errors_path=errors_path, progress=progress, stream=stream,
                            filename=filename)


async def _plan(svc: Services, stored: FileRow, window: str, *, model: str | None, strict: bool) -> DeadlinePlan:
    """The new batch's estimate against its window, told before it starts; a batch ``strict`` refuses is not
    created and its stored input is removed."""
    from obatch.bench.estimate.deadline import plan_batch, refuse_if_certain

    made = await plan_batch(svc, stored, window, model=model, concurrency=svc.pool.fixed,
                            schedule=svc.settings.schedule)
    (log.warning if made.expected_miss else log.info)("completion window: %s", made.message)
    if strict:
        try:
            refuse_if_certain(made)
        except errors.ConfigError:
            await _forget(svc, None, stored.id)
            raise
    return made


@contextlib.asynccontextmanager
async def _services(settings: Settings | None, backend: Backend | None, concurrency: Concurrency | None = None
                    ) -> AsyncIterator[Services]:
    """What a run in this process works with: the store, the backend (``backend``, or one opened here and closed
    after) and the estimator."""
    settings = settings or Settings()
    if concurrency is not None:
        settings = settings.model_copy(update={"concurrency": concurrency})
    engine, sessions = await open_store(settings.db_url)
    owned = backend is None
    try:
        backend = backend or await open_backend(settings)
        try:
            from obatch.bench.estimate.request import estimate_json_for_batch

            svc = Services(settings, sessions, backend, estimator=estimate_json_for_batch)
            try:
                yield svc
            finally:
                await svc.pool.stop()  # its watch of an outage: before the backend's client closes
        finally:
            if owned:
                await backend.aclose()
    finally:
        await engine.dispose()


async def _drive(svc: Services, batch: BatchRow, *, output: Path | None, errors_path: Path | None, progress: bool,
                 stream: bool, filename: str) -> RunReport:
    """Run a created batch of the local store to its end (resuming it where it stands), then write its files."""
    settings = svc.settings
    # The lines are checked once, as they are imported (a file with any problem is refused before any request);
    # here they are only counted, for the progress bar.
    total = await asyncio.to_thread(_count_lines, file_path(settings, batch.input_file_id))
    results_dir = settings.data_dir / "results" / batch.id
    output = output or results_dir / "output.jsonl"
    errors_path = errors_path or results_dir / "errors.jsonl"
    started = time.monotonic()
    async with svc.sessions() as session:
        fresh_row = await repo.get_batch(session, batch.id)
    bar = progress_bar(total, batch.id[:14], initial=fresh_row.completed + fresh_row.failed, enabled=progress)
    with contextlib.closing(bar) as tracker:
        while True:
            try:
                done = await process(svc, batch.id, progress=tracker, output=output, error=errors_path,
                                     stream=stream)
                break
            except BatchBusy as busy:  # the same run in another process (or a killed one's lease)
                log.warning("%s Waiting for it.", busy.message)
                await asyncio.sleep(min(busy.expires_in, settings.lease_heartbeat) + 0.1)
    if not await asyncio.to_thread(output.exists):  # the other process finished it: write our copy
        await write_results(svc, done.id, output, errors_path, NOT_RUN_CODES.get(done.status))
    if done.status == "failed":
        problems = errors.problems_from_json(done.errors_json)
        if done.in_progress_at is None:  # refused at import: the file is the problem, and it is not kept
            await _forget(svc, done.id, done.input_file_id)
            raise errors.InputFileError(summarise(problems, filename), problems)
        raise errors.InputFileError(f"Batch {done.id} failed.", problems)
    return RunReport(done, output, errors_path, time.monotonic() - started)


def _count_lines(path: Path) -> int:
    """The file's non-blank lines (what the import will count as requests, when the file is valid)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if not line.isspace())


async def _forget(svc: Services, batch_id: str | None, file_id: str) -> None:
    """Remove a batch refused at import, and its input file: a refused file leaves nothing behind in the store."""
    async with svc.sessions() as session:
        if batch_id is not None:
            await repo.delete_batch(session, batch_id)
        await repo.delete_files(session, [file_id])
        await session.commit()
    await asyncio.to_thread(file_path(svc.settings, file_id).unlink, missing_ok=True)


async def results_frame(settings: Settings, batch_id: str) -> pl.DataFrame:
    """One row per request of a batch, in input order, as a polars DataFrame."""
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            batch = await repo.find_batch(session, batch_id)
        facts = provenance.LineFacts(provenance.entries_of(batch) if batch is not None else [])
        records = []
        chunk: list[Any] = []
        async for row in repo.iter_rows(sessions, batch_id, (*_COLUMNS, *compact.INDEX)):
            chunk.append(row)
            if len(chunk) >= _CHUNK:
                records += _records(facts, await compact.restored(batch, _COLUMNS, chunk,
                                                                   data_dir=settings.data_dir)) if batch else []
                chunk.clear()
        records += _records(facts, await compact.restored(batch, _COLUMNS, chunk,
                                                           data_dir=settings.data_dir)) if batch and chunk else []
    finally:
        await engine.dispose()
    import polars as pl

    return pl.DataFrame(records, schema=result_schema(), orient="row")


def _record(row: tuple[Any, ...], facts: provenance.LineFacts) -> tuple[Any, ...]:
    """A store row (``_COLUMNS``' values, then its paging key) as ``RESULT_SCHEMA``'s values: the host's number
    becomes the host's facts, and ``cached_from`` (JSON text in the store) its fields."""
    *values, cached_from, host, _ = row
    return (*values, *facts(host, row[2]), orjson.loads(cached_from) if cached_from else None)


_CHUNK = 1000  # rows restored from their files at a time (``compact.restored``)


def _records(facts: provenance.LineFacts, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Frame records of rows (``_COLUMNS``, then the line): ``_record`` of each."""
    return [_record(row, facts) for row in rows]


async def _restored(items: Sequence[tuple[BatchRow, tuple[Any, ...]]], data_dir: Path
                    ) -> list[tuple[BatchRow, tuple[Any, ...]]]:
    """Items of rows read with ``compact.INDEX`` after ``_COLUMNS``, compacted ones restored from their files (under
    ``data_dir``)."""
    found = list(items)
    for batch, at in reading.by_batch(items):
        rows = await compact.restored(batch, _COLUMNS, [items[i][1] for i in at], data_dir=data_dir)
        for i, row in zip(at, rows, strict=True):
            found[i] = (batch, row)
    return found


def result_schema() -> dict[str, pl.DataType]:
    """``RESULT_SCHEMA`` as polars types (polars is imported here, on demand)."""
    import polars as pl

    return {name: pl.Struct(dict.fromkeys(CACHED_FROM, pl.Utf8)) if kind == "Struct" else getattr(pl, kind)()
            for name, kind in RESULT_SCHEMA.items()}


async def run(requests: RequestsInput, *, model: str | None = None, concurrency: Concurrency | None = None,
              settings: Settings | None = None, backend: Backend | None = None,
              endpoint: str = "/v1/chat/completions", progress: bool = True, fresh: bool = False,
              output_retries: int | None = None, cache: CachePolicy | None = None,
              schedule: Schedule | None = None, completion_window: str | None = None, strict_window: bool = False,
              **defaults: Any) -> pl.DataFrame:
    """Run requests (a batch file path, request dicts, or bare prompt strings) and return one row per request.

    ``model`` overrides every body's model (and is required for bare prompts); other keywords (``max_tokens=``,
    ``temperature=``…) fill the bodies of in-memory requests that do not set them. Re-running the same input with
    the same options resumes an interrupted run; ``fresh=True`` starts a new one. ``output_retries`` bounds how
    often a line asking for JSON is asked again when its answer is not that JSON (then it fails ``invalid_output``).
    ``schedule="file"`` runs the lines in the file's order instead of ``obatch.schedule``'s (see ``run_batch_file``).
    ``completion_window="30m"`` compares the estimate with that window before the run (a warning when it is
    expected to miss it); ``strict_window=True`` refuses the run when even the estimate's lower bound misses it.
    ``cache`` reuses stored answers: ``"auto"`` (the default, from ``settings.cache``) for requests their body
    determines, ``"all"`` for every request, ``"off"`` for none.
    """
    settings = settings or Settings()
    report = await run_batch_file(requests, settings=settings, backend=backend, model=model,
                                  concurrency=concurrency, endpoint=endpoint, progress=progress,
                                  source="notebook", fresh=fresh, defaults=defaults, output_retries=output_retries,
                                  cache=cache, schedule=schedule, completion_window=completion_window,
                                  strict_window=strict_window)
    return await results_frame(settings, report.batch.id)


async def retry_batch(batch_id: str, *, codes: Iterable[str] | None = None, settings: Settings | None = None,
                      backend: Backend | None = None, concurrency: Concurrency | None = None,
                      output: Path | None = None, errors_path: Path | None = None, progress: bool = True
                      ) -> RunReport:
    """Run a new batch of the chain's lines that failed for reasons a retry can change (``codes``: these error
    codes instead), linked to ``batch_id``; a retry of the chain left unfinished (a killed run) is resumed instead."""
    async with _services(settings, backend, concurrency) as svc:
        batch = await unfinished_retry(svc, batch_id) or await create_retry(svc, batch_id, codes=codes)
        return await _drive(svc, batch, output=output, errors_path=errors_path, progress=progress, stream=False,
                            filename=f"{batch_id}_retry.jsonl")


async def retry(batch_id: str, *, codes: Iterable[str] | None = None, settings: Settings | None = None,
                backend: Backend | None = None, concurrency: Concurrency | None = None, progress: bool = True
                ) -> pl.DataFrame:
    """Retry what failed in a batch (``retry_batch``) and return the chain's results as one frame: each line's
    latest outcome, with the batch that gave it (``batch_id``)."""
    report = await retry_batch(batch_id, codes=codes, settings=settings, backend=backend, concurrency=concurrency,
                               progress=progress)
    return await results(report.batch.id, merged=True, settings=settings)


async def results(batch_id: str, *, merged: bool = False, settings: Settings | None = None) -> pl.DataFrame:
    """The frame of a batch's lines finished so far (while it runs too), in input order, with the batch that gave
    each line (``batch_id``). ``merged``: over the batch's retry chain, each line's latest outcome."""
    settings = settings or Settings()
    engine, sessions = await open_store(settings.db_url)
    facts = reading.HostFacts()
    records: list[tuple[Any, ...]] = []
    chunk: list[tuple[BatchRow, tuple[Any, ...]]] = []

    def add(items: Sequence[tuple[BatchRow, tuple[Any, ...]]]) -> None:
        records.extend((*_record(row, facts(batch)), batch.id) for batch, row in items)

    try:  # as ``results_frame``'s rows, then the batch that gave the line
        async for item in reading.iter_finished(sessions, batch_id, (*_COLUMNS, *compact.INDEX), merged=merged):
            chunk.append(item)
            if len(chunk) >= _CHUNK:
                add(await _restored(chunk, settings.data_dir))
                chunk.clear()
        add(await _restored(chunk, settings.data_dir))
    finally:
        await engine.dispose()
    import polars as pl

    return pl.DataFrame(records, schema=result_schema() | {"batch_id": pl.Utf8()}, orient="row")


def _sync(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` from code that cannot ``await`` (also inside Jupyter's running loop, through nest-asyncio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _loop.run(work)
    import nest_asyncio

    nest_asyncio.apply()
    return asyncio.get_event_loop().run_until_complete(work)


def run_sync(requests: RequestsInput, **kwargs: Any) -> pl.DataFrame:
    """``run`` for code that cannot ``await``."""
    return _sync(run(requests, **kwargs))


def retry_sync(batch_id: str, **kwargs: Any) -> pl.DataFrame:
    """``retry`` for code that cannot ``await``."""
    return _sync(retry(batch_id, **kwargs))


def results_sync(batch_id: str, **kwargs: Any) -> pl.DataFrame:
    """``results`` for code that cannot ``await``."""
    return _sync(results(batch_id, **kwargs))
