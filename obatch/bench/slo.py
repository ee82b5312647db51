"""Goodput under a service-level objective, and the capacity at it (as vLLM's bench and GuideLLM report them).

An SLO bounds per-request latencies, e.g. ``ttft=500ms,tpot=50ms``: time to first token, time per output token after
the first, and ``latency`` (end to end). A request meets it when it succeeded and every bound holds (a bound whose
figure was not measured is not met). A point's **goodput** is its requests meeting the SLO per wall-clock second;
the **capacity** of a model at one num_ctx is the highest measured concurrency at which at least ``min_share`` of
the requests meet the SLO, and, where request-rate points were measured, the highest offered rate at which they do
(what GuideLLM's and vLLM's rate sweeps are for: how much traffic an engine takes within the SLO). Both are
computed from the stored requests of each point, so any SLO can be asked after the fact, without measuring again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import polars as pl
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import errors
from obatch.bench.schemas import Capacity
from obatch.store import bench_repo
from obatch.store.bench_tables import BenchSampleRow

MIN_SHARE = 0.95  # of a level's requests that must meet the SLO for the level to count as meeting it
_PART = re.compile(r"^\s*(ttft|tpot|latency|e2el)\s*=\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=500ms,tpot=50ms"`` → ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds; ``s`` suffix for seconds,
    no suffix means milliseconds; ``e2el`` is vLLM's name for ``latency``)."""
    slo: dict[str, float] = {}
    for part in (p for p in text.split(",") if p.strip()):
        found = _PART.match(part)
        if found is None:
            raise errors.ConfigError(f"An SLO looks like ttft=500ms,tpot=50ms,latency=2s; got {part.strip()!r}.",
                                     param="slo")
        name, value, unit = found.groups()
        slo["latency" if name == "e2el" else name] = float(value) * (1000.0 if unit == "s" else 1.0)
    if not slo:
        raise errors.ConfigError("An SLO needs at least one bound, e.g. ttft=500ms.", param="slo")
    return slo


def meets(sample: BenchSampleRow, slo: Mapping[str, float]) -> bool:
    if not sample.ok:
        return False
    figures = {"ttft": sample.ttft_ms, "latency": sample.latency_ms, "tpot": None}
    if sample.ttft_ms is not None and sample.completion_tokens:
        figures["tpot"] = (sample.latency_ms - sample.ttft_ms) / max(sample.completion_tokens - 1, 1)
    return all(figures[k] is not None and figures[k] <= bound for k, bound in slo.items())  # type: ignore[operator]


def count_met(point_ids: Sequence[int], samples: Iterable[BenchSampleRow], slo: Mapping[str, float]
              ) -> dict[int, tuple[int, int]]:
    """Per point: (requests meeting the SLO, requests measured)."""
    counts: dict[int, tuple[int, int]] = dict.fromkeys(point_ids, (0, 0))
    for sample in samples:
        met, total = counts[sample.point_id]
        counts[sample.point_id] = (met + meets(sample, slo), total + 1)
    return counts


async def met_counts(session: AsyncSession, point_ids: Sequence[int], slo: Mapping[str, float]
                     ) -> dict[int, tuple[int, int]]:
    """Per stored point: (requests meeting the SLO, requests measured)."""
    return count_met(point_ids, await bench_repo.samples_of(session, list(point_ids)), slo)


async def with_goodput(session: AsyncSession, points: pl.DataFrame, slo: Mapping[str, float]) -> pl.DataFrame:
    """``points`` (``frames.points`` rows) with ``goodput`` (req/s meeting the SLO) and ``slo_share`` columns."""
    return add_goodput(points, await met_counts(session, points["id"].to_list(), slo))


def add_goodput(points: pl.DataFrame, counts: Mapping[int, tuple[int, int]]) -> pl.DataFrame:
    """``points`` with ``goodput`` and ``slo_share`` from per-point (met, measured) counts (``count_met``)."""
    met = [counts[i][0] for i in points["id"].to_list()]
    total = [counts[i][1] for i in points["id"].to_list()]
    return points.with_columns(
        (pl.Series("met", met, dtype=pl.Float64) / pl.col("wall_seconds")).alias("goodput"),
        (pl.Series("met", met, dtype=pl.Float64) / pl.Series("n", total, dtype=pl.Float64)).alias("slo_share"))


def _levels(points: pl.DataFrame, config: list[str]) -> pl.DataFrame:
    """One row per load level of ``config``: its newest run's repeats pooled."""
    newest = points.sort("created_at").group_by(config).agg(pl.col("run_id").last().alias("_newest"))
    return (points.join(newest, on=config, nulls_equal=True).filter(pl.col("run_id") == pl.col("_newest"))
            .group_by(config).agg(pl.col("goodput").mean(), pl.col("slo_share").mean(), pl.col("req_per_s").mean(),
                                  pl.col("achieved_rate").mean())
            .sort(config))


def capacities(points: pl.DataFrame, slo: Mapping[str, float], *, min_share: float = MIN_SHARE) -> list[Capacity]:
    """Per (backend, model, num_ctx) of ``with_goodput`` rows: the highest concurrency meeting the SLO, and, where
    request-rate points exist, the highest offered rate meeting it (a second answer, ``load`` "rate"), judged on
    each level's newest run (its repeats pooled)."""
    out: list[Capacity] = []
    kept = points.filter(~pl.col("excluded"))
    if kept.is_empty():
        return out
    where = ["backend", "model", "num_ctx"]
    closed = _levels(kept.filter(pl.col("rate").is_null()), [*where, "concurrency"])
    opened = _levels(kept.filter(pl.col("rate").is_not_null()), [*where, "rate", "arrival", "concurrency"])
    for (backend, model, num_ctx), group in closed.group_by(where, maintain_order=True):
        rows = group.to_dicts()
        top = _top(rows, "concurrency", min_share)
        out.append(Capacity(
            backend=str(backend), model=str(model), num_ctx=int(num_ctx), slo=dict(slo), min_share=min_share,
            concurrency=top["concurrency"] if top else None, goodput=top["goodput"] if top else None,
            req_per_s=top["req_per_s"] if top else None,
            levels=[{"concurrency": r["concurrency"], "goodput": r["goodput"], "slo_share": r["slo_share"],
                     "req_per_s": r["req_per_s"]} for r in rows]))
    for (backend, model, num_ctx), group in opened.group_by(where, maintain_order=True):
        rows = group.to_dicts()
        top = _top(rows, "rate", min_share)
        out.append(Capacity(
            backend=str(backend), model=str(model), num_ctx=int(num_ctx), slo=dict(slo), min_share=min_share,
            load="rate", rate=top["rate"] if top else None, arrival=top["arrival"] if top else None,
            goodput=top["goodput"] if top else None, req_per_s=top["req_per_s"] if top else None,
            levels=[{k: r[k] for k in ("rate", "arrival", "concurrency", "achieved_rate", "goodput", "slo_share",
                                       "req_per_s")} for r in rows]))
    return out


def _top(rows: list[dict[str, Any]], load: str, min_share: float) -> dict[str, Any] | None:
    meeting = [r for r in rows if (r["slo_share"] or 0.0) >= min_share]
    return max(meeting, key=lambda r: r[load]) if meeting else None
