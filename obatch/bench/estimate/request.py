"""One path from a question to its estimates, whoever asks: the estimate endpoint, ``obatch estimate``, the notebook
functions and a batch at its start, so one file gets one figure.

An ``EstimateRequest`` says what is asked (token lengths, or a batch file; the configuration; the engine that will
run it). ``estimate_groups`` answers it per model group, each by ``estimate_model``: the store's fits
(``obatch.bench.estimate.fit``), the token calibration (``calibrate``), the history correction (``history``), then the
workload's shape (``shape``) estimated on the fits (``predict``). ``estimate_json_for_batch`` is the same path at a
batch's start, the hook the batch lifecycle is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import context, errors
from obatch.backends.base import Backend, capabilities_of
from obatch.backends.pool import Pool
from obatch.bench.estimate.calibrate import calibration_for
from obatch.bench.estimate.fit import ConfigFit, decode_timings, fits_for, fits_preferring
from obatch.bench.estimate.history import history_ratios, pilot_speed
from obatch.bench.estimate.predict import Estimate, estimate_from_fits, nothing_left, pick_num_ctx, pilot_extrapolation
from obatch.bench.estimate.replay import cached_shares
from obatch.bench.estimate.shape import (
    SHARE_SAMPLE,
    Line,
    Lines,
    Shape,
    TokenCalibration,
    file_rows,
    shape_of,
)
from obatch.store import bench_repo, pilots, repo
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow, PilotRow

log = logging.getLogger("obatch.bench")

ROUTE_SECONDS = 10.0  # how long a batch's start estimate waits for the engine to say a model's context length
SLOTS_SECONDS = 2.0  # how long an estimate under auto concurrency waits for the engine to say its slots


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimateRequest:
    """What an estimate is asked for: ``num_requests`` × (``prompt_tokens``, ``output_tokens``) on ``model``, or a
    batch ``file`` (``model`` then overrides every line's model, as ``obatch run --model`` does), at ``num_ctx`` and
    ``concurrency`` (num_ctx None: the one the batch will pick, or the best measured; concurrency None: auto, the
    level auto is expected to settle on, from the slots ``engine`` reports), with the model's load time or without.

    ``backend``: prefer points measured on it. ``engine``, when given, tells the context window obatch will pick.
    ``file_sha256`` finds the lines a pilot of the file already ran for ``owner`` (left out: the batch takes them as
    finished) and the answers it measured. ``batch``: the batch being estimated at its start — only points of
    ``backend`` count, and its own rows are left out of what was learnt (the lines a pilot ran are already finished
    there). ``schedule``: the order the batch will run its lines in (``"auto"``, obatch's default, or ``"file"``),
    which decides how much of each prompt the engine finds in its prefix cache (``obatch.bench.estimate.replay``)."""

    model: str | None = None
    num_requests: int | None = None
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    file: Path | None = None
    file_sha256: str | None = None
    owner: str = ""  # whose pilot lines count (the server's API key owner; "" for the CLI and notebook)
    backend: str | None = None
    num_ctx: int | None = None
    concurrency: int | None = None
    include_load: bool = True
    engine: Backend | None = None
    batch: str | None = None
    schedule: str = "auto"


async def estimate_groups(session: AsyncSession, request: EstimateRequest) -> list[Estimate]:
    """Estimates for the request's token lengths on its model, or for its batch file: one per model group of the
    file. A file is estimated exactly as its batch will be at its start (``estimate_model``)."""
    model, backend = request.model, request.backend
    if request.file is None:
        if model is None or request.num_requests is None or request.prompt_tokens is None or \
                request.output_tokens is None:
            raise errors.ConfigError("Give model, num_requests, prompt_tokens and output_tokens, or an input file.",
                                     param="num_requests")
        fits = await fits_preferring(session, model, backend)
        history = await history_ratios(session, model, fits[0].backend, fits=fits,
                                       calibration=await calibration_for(session, model, fits))
        shape = Shape.uniform(request.num_requests, request.prompt_tokens, request.output_tokens)
        return [await asyncio.to_thread(
            functools.partial(estimate_from_fits, fits, shape, num_ctx=request.num_ctx,
                              concurrency=request.concurrency, include_load=request.include_load, history=history))]
    piloted = await pilots.all_of(session, request.owner, request.file_sha256) if request.file_sha256 else []
    done = {(p.custom_id, p.body_sha256) for p in piloted if p.used_by is None}
    groups, skipped = await asyncio.to_thread(file_rows, request.file, model, done=done)
    if not groups and not skipped:
        raise errors.ConfigError("The file holds no valid batch requests.", param="input_file_id")
    out = []
    for name in [*groups, *(m for m in skipped if m not in groups)]:
        out.append(await estimate_model(session, request, name, groups.get(name) or Lines(),
                                        pilot=[p for p in piloted if p.model == name], done=skipped.get(name, 0)))
    return out


async def estimate_model(session: AsyncSession, request: EstimateRequest, model: str, lines: Lines, *,
                         pilot: Sequence[PilotRow] = (), done: int = 0) -> Estimate:
    """The one estimate of a model's lines, whoever asks (the estimate endpoint and command line for a file, the
    batch at its start): the same rows, answer lengths, context window and draws give the same figures. ``pilot``:
    the model's lines a pilot of the file ran; ``done``: how many of them the batch takes as finished.

    The context window is the one the batch will run: obatch's pick for the longest request when the engine sets
    one (``engine``'s capabilities; assumed when no engine is at hand), or ``num_ctx`` when given; answers that
    run on to the context end there. The model's context length only lowers that pick for a model whose context
    is smaller; it is not asked here (an estimate needs no engine, and must not wait on a busy one) but taken from
    what an engine pool learnt when it routed the model (a batch routes its models before its estimate, a pilot
    before it runs). Without benchmark points, a pilot's own latencies are extrapolated instead; with them, a
    pilot's wall time against the points' model tells today's engine speed (``pilot_speed``)."""
    backend, engine, concurrency, exclude = request.backend, request.engine, request.concurrency, request.batch
    timings = await decode_timings(session, model, pilot, exclude_batch=exclude)
    try:
        fits = (await fits_for(session, model, backend, timings=timings)) if request.batch is not None else \
            await fits_preferring(session, model, backend, timings=timings)
    except errors.NotFoundError:
        fits = []
    population = lines.count + done
    if not fits:
        timed = [p for p in pilot if p.latency_ms]
        if len(timed) >= 2:
            return pilot_extrapolation(model, backend or (engine.name if engine else ""), lines.count, timed, done,
                                       include_load=request.include_load, concurrency=concurrency)
        raise errors.NotFoundError(f"No benchmark points for model {model!r}: run `obatch bench --model {model}` "
                                   "first, or a pilot of the file, which needs no benchmark (--pilot auto; pilot=auto "
                                   "on the endpoint).", param="model")
    if not lines.count:
        return nothing_left(fits[0], model, done)
    num_ctx = request.num_ctx
    if num_ctx is None and (engine is None or capabilities_of(engine).sets_num_ctx):
        known = engine.context_lengths.get(model) if isinstance(engine, Pool) else None
        num_ctx = context.fit_num_ctx(lines.need, known).num_ctx
    endpoint = next(iter(lines.urls)) if len(lines.urls) == 1 else None
    window = concurrency or max(f.concurrency for f in fits)
    shares = cached_shares(lines.texts, window) if pilot else []
    calibration = await calibration_for(session, model, fits, endpoint=endpoint, pilot=pilot, population=population,
                                        exclude_batch=exclude,
                                        repeated=statistics.fmean(shares) if shares else 0.0)
    history = await history_ratios(session, model, fits[0].backend, fits=fits, calibration=calibration)
    speed = await asyncio.to_thread(pilot_speed, fits, pilot, num_ctx=num_ctx,
                                    cached=calibration.cache_kept * statistics.fmean(shares) if shares else 0.0) \
        if pilot else None
    slots = await engine_slots(engine) if concurrency is None and engine is not None else None
    made = await asyncio.to_thread(_estimate_rows, fits, lines, calibration, window=window, num_ctx=num_ctx,
                                   concurrency=concurrency, include_load=request.include_load, history=history,
                                   speed=speed, slots=slots, schedule=request.schedule)
    made.done_requests = done
    if done:
        made.notes.append(f"{done} line(s) a pilot already ran are not counted: the batch takes them as finished")
    return made


async def engine_slots(engine: Backend) -> int | None:
    """The parallel slots the engine reports (llama.cpp does, Ollama does not), where auto concurrency starts; None
    when it does not say or does not answer within ``SLOTS_SECONDS`` (an estimate must not wait on a busy one)."""
    with contextlib.suppress(errors.BackendError, TimeoutError, OSError):
        async with asyncio.timeout(SLOTS_SECONDS):
            return await engine.slots()
    return None


def _estimate_rows(fits: Sequence[ConfigFit], lines: Lines, calibration: TokenCalibration, *, window: int,
                   schedule: str, **options: Any) -> Estimate:
    """``shape_of`` then ``estimate_from_fits``: the CPU part of an estimate, run in a worker thread. Answers
    that run on to the context end at the batch's num_ctx (when known, else the measured one it would use)."""
    num_ctx = options.get("num_ctx") or pick_num_ctx(fits, lines.need, None)
    return estimate_from_fits(fits, shape_of(lines, calibration, window=window, num_ctx=num_ctx, schedule=schedule),
                              **options)


async def estimate(session: AsyncSession, model: str | None, **kwargs: Any) -> Estimate:
    """``estimate_groups`` for one model (a file's lines all count as ``model``): the notebook and CLI form;
    ``kwargs`` are the other fields of ``EstimateRequest``."""
    return (await estimate_groups(session, EstimateRequest(model=model, **kwargs)))[0]


async def estimate_batch(sessions: Sessions, batch: BatchRow, backend: Backend, concurrency: int | None
                         ) -> dict[str, Any] | None:
    """The estimate for a batch about to run (its pending requests, per model group, at the num_ctx obatch will
    pick and the batch's concurrency — ``None`` for auto: the level auto is expected to settle on), made by
    ``estimate_model`` as the file's estimate is; None when a model has no benchmark points."""
    async with sessions() as session:
        sha = await bench_repo.stored_file_sha256(session, batch.input_file_id)
        piloted = await pilots.all_of(session, batch.owner, sha) if sha else []
        models = [g.model for g in await repo.pending_groups(session, batch.id, context.DEFAULT_OUTPUT_BUDGET)]
        for model in models:  # before the rows are read: reading them costs time, for nothing
            if not any(p.model == model for p in piloted) and not await fits_for(session, model, backend.name):
                return None
    if isinstance(backend, Pool):  # the batch routes its models next: learn their context lengths now
        for model in models:
            with contextlib.suppress(errors.BackendError, TimeoutError):
                async with asyncio.timeout(ROUTE_SECONDS):
                    await backend.route(model)
    request = EstimateRequest(backend=backend.name, engine=backend, concurrency=concurrency, batch=batch.id,
                              schedule=batch.schedule or "auto")
    async with sessions() as session:
        groups: dict[str, Lines] = defaultdict(Lines)
        async for model, url, prompt, max_tokens in bench_repo.pending_lines(session, batch.id):
            groups[model].add(Line(prompt, max_tokens, url))
        parts = []
        for model, lines in groups.items():
            for url, body in await bench_repo.pending_bodies(session, batch.id, model, SHARE_SAMPLE):
                lines.read(url, orjson.loads(body))
            mine = [p for p in piloted if p.model == model]
            try:
                parts.append(await estimate_model(session, request, model, lines, pilot=mine,
                                                  done=sum(p.used_by == batch.id for p in mine)))
            except errors.NotFoundError:
                return None
    if not parts:
        return None
    return {
        "seconds": sum(p.seconds for p in parts), "low": sum(p.low for p in parts),
        "high": sum(p.high for p in parts), "concurrency": concurrency, "made_at": time.time(),
        "groups": [_kept(p.as_dict()) for p in parts],
    }


def _kept(group: dict[str, Any]) -> dict[str, Any]:
    """What a batch keeps of a model group's estimate: the candidates only at its num_ctx (the sweep's curve the
    live ETA moves along once auto has settled, ``obatch.progress.prior_levels``)."""
    ctx = group.get("num_ctx")
    return group | {"candidates": [c for c in group.get("candidates") or [] if c.get("num_ctx") == ctx]}


async def estimate_json_for_batch(sessions: Sessions, batch: BatchRow, backend: Backend, concurrency: int | None
                                  ) -> str | None:
    """``estimate_batch`` as the JSON kept in ``BatchRow.estimate_json``. An estimate is advice: any failure
    to make one is logged and the batch runs without it."""
    try:
        made = await estimate_batch(sessions, batch, backend, concurrency)
    except Exception:
        log.warning("could not estimate batch %s", batch.id, exc_info=True)
        return None
    return orjson.dumps(made).decode() if made is not None else None
