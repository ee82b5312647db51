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
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from obatch import errors
from obatch.backends import Backend, open_backend
from obatch.batches import Services, create_batch, file_path, process, read_chunks, store_file, write_results
from obatch.config import Settings
from obatch.jsonl import Limits, validate_file
from obatch.lease import BatchBusy
from obatch.store import repo
from obatch.store.db import open_store
from obatch.store.tables import BatchRow, RequestRow

log = logging.getLogger("obatch.api")

RequestsInput = str | Path | Iterable[Mapping[str, Any] | str]

RESULT_SCHEMA = {
    "line": pl.Int64, "custom_id": pl.Utf8, "model": pl.Utf8, "status": pl.Utf8, "content": pl.Utf8,
    "finish_reason": pl.Utf8, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "latency_ms": pl.Float64,
    "ttft_ms": pl.Float64, "num_ctx": pl.Int64, "truncated": pl.Boolean, "attempts": pl.Int64,
    "error_code": pl.Utf8, "error": pl.Utf8,
}
_COLUMNS = (RequestRow.custom_id, RequestRow.model, RequestRow.state, RequestRow.content,
            RequestRow.finish_reason, RequestRow.prompt_tokens, RequestRow.completion_tokens,
            RequestRow.latency_ms, RequestRow.ttft_ms, RequestRow.num_ctx, RequestRow.truncated,
            RequestRow.attempts, RequestRow.error_code, RequestRow.error_message)


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
            else:
                body = {"messages": [{"role": "user", "content": item}]}
            if model:
                body["model"] = model
            item = {"custom_id": f"request-{i}", "method": "POST", "url": endpoint, "body": body}
        line = dict(item)
        if defaults and isinstance(line.get("body"), dict):
            line["body"] = {**defaults, **line["body"]}
        yield orjson.dumps(line) + b"\n"


async def _iterate(lines: Iterable[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def run_batch_file(
    requests: RequestsInput, *, settings: Settings | None = None, backend: Backend | None = None,
    model: str | None = None, concurrency: int | None = None, output: Path | None = None,
    errors_path: Path | None = None, endpoint: str = "/v1/chat/completions", progress: bool = True,
    source: str = "cli", fresh: bool = False, stream: bool = False, defaults: Mapping[str, Any] | None = None,
) -> RunReport:
    """Run a batch file (or a list of requests or prompts) to the end; resume an unfinished identical run."""
    settings = settings or Settings()
    concurrency = concurrency or settings.concurrency
    engine, sessions = await open_store(settings.db_url)
    owned = backend is None
    backend = backend or await open_backend(settings)
    try:
        svc = Services(settings, sessions, backend)
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
        stored_path = file_path(settings, stored.id)
        limits = Limits(max_bytes=settings.max_file_bytes, max_lines=settings.max_lines)
        try:
            total, _ = await asyncio.to_thread(validate_file, stored_path, limits=limits, model=model)
        except errors.InputFileError as exc:
            if path is not None:
                exc.message = exc.message.replace(stored_path.name, path.name)
            await asyncio.to_thread(stored_path.unlink, missing_ok=True)
            raise
        signature = hashlib.sha256(
            f"{stored.sha256}|{model}|{backend.name}|{source}".encode()).hexdigest()
        async with sessions() as session:
            batch = None if fresh else await repo.find_resumable(session, signature)
        if batch is None:
            batch = await create_batch(svc, input_file_id=stored.id, endpoint=None, completion_window="7d",
                                       model=model, source=source, signature=signature,
                                       concurrency=concurrency)
        else:
            await asyncio.to_thread(stored_path.unlink, missing_ok=True)
            async with sessions() as session:
                await session.delete(await repo.get_file(session, stored.id))
                await session.commit()
        results_dir = settings.data_dir / "results" / batch.id
        output = output or results_dir / "output.jsonl"
        errors_path = errors_path or results_dir / "errors.jsonl"
        started = time.monotonic()
        bar = _progress_bar(batch, sessions, total, enabled=progress)
        with contextlib.closing(await bar) as tracker:
            while True:
                try:
                    done = await process(svc, batch.id, concurrency=concurrency, progress=tracker.update,
                                         output=output, error=errors_path, stream=stream)
                    break
                except BatchBusy as busy:  # the same run in another process (or a killed one's lease)
                    log.warning("%s Waiting for it.", busy.message)
                    await asyncio.sleep(min(busy.expires_in, settings.lease_heartbeat) + 0.1)
        if not await asyncio.to_thread(output.exists):  # the other process finished it: write our copy
            await write_results(svc, done.id, output, errors_path,
                                {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(done.status))
        if done.status == "failed":
            raise errors.InputFileError(f"Batch {done.id} failed validation.", [])
        return RunReport(done, output, errors_path, time.monotonic() - started)
    finally:
        if owned:
            await backend.aclose()
        await engine.dispose()


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


async def _progress_bar(batch: BatchRow, sessions: Any, total: int, *, enabled: bool) -> Any:
    """A tqdm bar (a widget in Jupyter, text on a terminal, nothing when output is not a terminal)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    async with sessions() as session:
        fresh = await repo.get_batch(session, batch.id)
    return tqdm(total=total, initial=fresh.completed + fresh.failed, desc=batch.id[:14], unit="req",
                disable=None, dynamic_ncols=True)


async def results_frame(settings: Settings, batch_id: str) -> pl.DataFrame:
    """One row per request of a batch, in input order, as a polars DataFrame."""
    engine, sessions = await open_store(settings.db_url)
    try:
        records = [
            {"line": line, "custom_id": c, "model": m, "status": s, "content": t, "finish_reason": f,
             "prompt_tokens": p, "completion_tokens": k, "latency_ms": lat, "ttft_ms": tt, "num_ctx": n,
             "truncated": tr, "attempts": a, "error_code": ec, "error": em}
            async for (c, m, s, t, f, p, k, lat, tt, n, tr, a, ec, em, line) in repo.iter_rows(
                sessions, batch_id, _COLUMNS)
        ]
    finally:
        await engine.dispose()
    return pl.DataFrame(records, schema=RESULT_SCHEMA)


async def run(requests: RequestsInput, *, model: str | None = None, concurrency: int | None = None,
              settings: Settings | None = None, backend: Backend | None = None,
              endpoint: str = "/v1/chat/completions", progress: bool = True, fresh: bool = False,
              **defaults: Any) -> pl.DataFrame:
    """Run requests (a batch file path, request dicts, or bare prompt strings) and return one row per request.

    ``model`` overrides every body's model (and is required for bare prompts); other keywords (``max_tokens=``,
    ``temperature=``…) fill the bodies of in-memory requests that do not set them. Re-running the same input with
    the same options resumes an interrupted run; ``fresh=True`` starts a new one.
    """
    settings = settings or Settings()
    report = await run_batch_file(requests, settings=settings, backend=backend, model=model,
                                  concurrency=concurrency, endpoint=endpoint, progress=progress,
                                  source="notebook", fresh=fresh, defaults=defaults)
    return await results_frame(settings, report.batch.id)


def run_sync(requests: RequestsInput, **kwargs: Any) -> pl.DataFrame:
    """``run`` for code that cannot ``await`` (also inside Jupyter's running loop, through nest-asyncio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run(requests, **kwargs))
    import nest_asyncio

    nest_asyncio.apply()
    return asyncio.get_event_loop().run_until_complete(run(requests, **kwargs))
