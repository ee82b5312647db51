"""What the benchmark endpoints answer, as plain JSON-able dicts (the server's controller is a thin door to these;
nothing here knows about HTTP)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import batches, errors
from obatch.backends.base import Backend
from obatch.bench import frames
from obatch.bench.answers import Z
from obatch.bench.estimate.history import estimates_vs_actuals
from obatch.bench.estimate.predict import Estimate
from obatch.bench.estimate.request import EstimateRequest, estimate_groups
from obatch.bench.schemas import BenchConfig, BenchPoint, BenchRun, Capacity, EstimateRecord
from obatch.bench.slo import MIN_SHARE, capacities, parse_slo, with_goodput
from obatch.config import Settings
from obatch.protocol import DurationEstimate
from obatch.store import repo
from obatch.store.db import Sessions

HOST_FIELDS = frames.HOST_FIELDS


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in frame.to_dicts():
        record = {k: _clean(v) for k, v in row.items()}
        if "samples_json" in record:
            record["sample_responses"] = orjson.loads(record.pop("samples_json") or "[]")
        if "errors_json" in record:
            record["errors"] = orjson.loads(record.pop("errors_json") or "{}")
        out.append(record)
    return out


def point_models(frame: pl.DataFrame) -> list[BenchPoint]:
    return [BenchPoint.model_validate(r) for r in _records(frame)]


def config_models(frame: pl.DataFrame) -> list[BenchConfig]:
    return [BenchConfig.model_validate(r) for r in _records(frame)]


async def best_per_model(session: AsyncSession) -> list[BenchConfig]:
    """Per model (and backend): its best configuration (``obatch.bench.best``)."""
    return config_models(frames.best_configs(frames.summary(await frames.points(session))))


async def model_history(session: AsyncSession, model: str, *, num_ctx: int | None = None,
                        concurrency: int | None = None, slo: str | None = None) -> list[BenchPoint]:
    """Every stored point of a model, oldest first, optionally at one num_ctx and/or concurrency; with an ``slo``
    (``ttft=500ms,tpot=50ms``) each point's goodput under it."""
    bounds = parse_slo(slo) if slo is not None else None
    frame = await frames.points(session, models=[model])
    if frame.is_empty():
        raise errors.NotFoundError(f"No benchmark points for model {model!r}.", param="name")
    if num_ctx is not None:
        frame = frame.filter(pl.col("num_ctx") == num_ctx)
    if concurrency is not None:
        frame = frame.filter(pl.col("concurrency") == concurrency)
    if bounds is not None:
        frame = await with_goodput(session, frame, bounds)
    return point_models(frame)


async def capacity(session: AsyncSession, model: str, slo: str, *, num_ctx: int | None = None,
                   min_share: float = MIN_SHARE) -> list[Capacity]:
    """The capacity of a model under an SLO at each measured num_ctx (``obatch.bench.slo``)."""
    bounds = parse_slo(slo)
    frame = await frames.points(session, models=[model], num_ctx=num_ctx)
    if frame.is_empty():
        raise errors.NotFoundError(f"No benchmark points for model {model!r}.", param="model")
    return capacities(await with_goodput(session, frame, bounds), bounds, min_share=min_share)


async def compare(session: AsyncSession, models: list[str], *, num_ctx: int | None = None) -> list[BenchConfig]:
    """Models side by side: each configuration's newest measurement (repeats folded), each model's best marked."""
    if not models:
        raise errors.ConfigError("Name the models to compare: ?models=a,b", param="models")
    summary = frames.summary(await frames.points(session, models=models, num_ctx=num_ctx))
    if summary.is_empty():
        return []
    return config_models(frames.mark_best(frames.latest_configs(summary)).sort(["num_ctx", "concurrency", "model"]))


def combined(parts: list[Estimate], pilot: dict[str, Any] | None = None) -> DurationEstimate:
    """One answer: the estimate itself for one model; for several, their totals and each in ``groups``."""
    made = [DurationEstimate.model_validate(p.as_dict() | {"pilot": pilot}) for p in parts]
    return DurationEstimate.of_groups(made, pilot=made[0].pilot)


async def estimate(session: AsyncSession, settings: Settings, owner: str | None, *, backend: str | None,
                   input_file_id: str | None = None, pilot: int | str | None = None, engine: Backend | None = None,
                   sessions: Sessions | None = None, completion_window: str | None = None, **kwargs: Any
                   ) -> DurationEstimate:
    """``estimate_groups`` as one answer, for token lengths or for a stored input file the caller owns. With
    ``pilot`` (lines, or ``"auto"``), a random sample of the file runs first on ``engine`` (``piloted``). With
    ``completion_window``, the answer's ``deadline`` says whether a batch of it would meet that window
    (``obatch.bench.estimate.deadline``)."""
    if completion_window is None:
        return await _estimate(session, settings, owner, backend=backend, input_file_id=input_file_id, pilot=pilot,
                               engine=engine, sessions=sessions, **kwargs)
    from obatch.batches import window_seconds
    from obatch.bench.estimate.deadline import plan

    seconds = window_seconds(completion_window, minimum=settings.min_completion_window)
    made = await _estimate(session, settings, owner, backend=backend, input_file_id=input_file_id, pilot=pilot,
                           engine=engine, sessions=sessions, **kwargs)
    return made.model_copy(update={"deadline": plan(made, seconds)})


async def _estimate(session: AsyncSession, settings: Settings, owner: str | None, *, backend: str | None,
                    input_file_id: str | None, pilot: int | str | None, engine: Backend | None,
                    sessions: Sessions | None, **kwargs: Any) -> DurationEstimate:
    from obatch.bench.pilot_run import pilot_size

    pilot = pilot_size(pilot)
    file = sha = None
    if input_file_id is not None:
        row = await repo.get_file(session, input_file_id, owner)
        file, sha = batches.file_path(settings, row.id), row.sha256 or None
    if pilot is not None:
        if file is None or engine is None or sessions is None:
            raise errors.ConfigError("A pilot runs lines of an input file: give input_file_id.", param="pilot")
        return await piloted(session, sessions, settings, engine, file, pilot, backend=backend, owner=owner or "",
                             **kwargs)
    return combined(await estimate_groups(session, EstimateRequest(backend=backend, file=file, engine=engine,
                                                                   file_sha256=sha, owner=owner or "", **kwargs)))


async def piloted(session: AsyncSession, sessions: Sessions, settings: Settings, engine: Backend, file: Path,
                  pilot: int | str, *, backend: str | None, owner: str = "", **kwargs: Any) -> DurationEstimate:
    """Run a pilot of the file on ``engine`` for ``owner`` (whose batch of that file later takes its lines as
    finished) and estimate by its answers. ``pilot="auto"`` grows it while its answers leave the estimate unsure
    (``obatch.bench.pilot_run``: 16 lines, doubled up to a quarter of the file, until within ±15%)."""
    from obatch.bench.pilot_run import AUTO, AUTO_WITHIN, auto_sizes, run_pilot, valid_lines

    auto = pilot == AUTO
    sizes = auto_sizes(await asyncio.to_thread(valid_lines, file, kwargs.get("model"))) if auto else [int(pilot)]
    done: dict[str, Any] = {}
    for size in sizes:
        ran = await run_pilot(sessions, engine, settings, file, size=size, model=kwargs.get("model"),
                              concurrency=kwargs.get("concurrency"), owner=owner)
        done = ran | {"ran": done.get("ran", 0) + ran["ran"], "failed": done.get("failed", 0) + ran["failed"],
                      "seconds": done.get("seconds", 0.0) + ran["seconds"],
                      "reused": done.get("reused", ran["reused"]), "auto": auto}
        made = combined(await estimate_groups(session, EstimateRequest(
            backend=backend, file=file, engine=engine, file_sha256=ran["file_sha256"], owner=owner, **kwargs)), done)
        if (unsure := answers_margin(made)) <= AUTO_WITHIN:
            break
    else:
        if auto:
            made.notes.append(f"the pilot's {ran['requests']} lines still leave the estimate unsure by "
                              f"±{unsure:.0%}: this file's answers vary a lot in length; an automatic pilot runs at "
                              "most a quarter of the file, a larger fixed one narrows it")
    return made


def answers_margin(made: DurationEstimate) -> float:
    """How unsure the file's unknown answer lengths leave an estimate (the relative half-width of their part of
    its 95% interval; the worst of its model groups). Extrapolated from a pilot's own latencies, the whole interval
    is the sample's."""
    worst = 0.0
    for part in made.groups or [made]:
        if part.answers is not None and part.output_share is not None:
            worst = max(worst, Z * part.answers.mean_cv * part.output_share)
        elif part.seconds > 0:
            worst = max(worst, part.high / part.seconds - 1)
    return worst


async def estimate_records(session: AsyncSession, owner: str | None = None) -> list[EstimateRecord]:
    """Estimate vs actual of finished batches (the caller's own when ``owner`` is given)."""
    return [EstimateRecord.model_validate({k: _clean(v) for k, v in r.items()})
            for r in await estimates_vs_actuals(session, owner=owner)]


async def list_runs(session: AsyncSession, *, host_details: bool = True) -> list[BenchRun]:
    """Benchmark runs; without ``host_details`` the machine's name, CPU and notebook path are left out."""
    runs = [BenchRun.model_validate(r) for r in _records(await frames.runs(session))]
    if host_details:
        return runs
    return [r.model_copy(update=dict.fromkeys(HOST_FIELDS)) for r in runs]
