"""Deadline-aware plans: a batch's estimate against its ``completion_window``, made when the batch is created.

A batch that runs past its window expires and its remaining lines end as ``batch_expired``; the plan says so before
it starts: whether the estimate is past the window and by how much, whether even the estimate's lower bound is
(then ``--strict-window``, or the server's ``obatch_strict_window`` metadata key, refuses the batch), and which
configurations would meet it: each num_ctx × concurrency the sweep measured, as the estimate predicts them for this
file (``DurationEstimate.candidates``, scaled by the corrections the estimate applied, load included), and, where
one host is not enough, the hosts it would take (the lines split evenly across hosts like the one estimated, each
loading the model once). A file of several models runs them one after another: a configuration's time is the sum of
its groups'.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from obatch import errors
from obatch.backends.pool import Pool
from obatch.batches import Services, file_path, window_seconds
from obatch.bench.estimate.request import EstimateRequest, estimate_groups
from obatch.protocol import DeadlineOption, DeadlinePlan, DurationEstimate
from obatch.store import bench_repo, pilots
from obatch.store.tables import FileRow

log = logging.getLogger("obatch.bench")

STRICT_KEY = "obatch_strict_window"  # a batch's metadata key: "true" refuses a batch certain to miss its window
OPTIONS = 4  # configurations listed at most
PLAN_SECONDS = 20.0  # how long a batch's creation waits for its estimate (advice: past it, the plan says so)


def _clock(seconds: float) -> str:
    """A duration for people: 0.8 s, 45 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _factor(part: DurationEstimate) -> float:
    """What the estimate applied beyond a candidate's modelled time (finished batches' correction, today's speed
    from a pilot, drawn answer lengths): its running time over the candidate's of its own configuration, where that
    configuration was measured; else the history's correction alone."""
    own = next((c for c in part.candidates if (c.num_ctx, c.concurrency) == (part.num_ctx, part.concurrency)), None)
    if own is not None and own.seconds > 0:
        return (part.seconds - part.load_seconds) / own.seconds
    return part.history_factor


def _options(made: DurationEstimate, window: float, hosts: int) -> list[DeadlineOption]:
    """The configurations expected to meet ``window``, fastest first: measured ones on the hosts there are, else
    the fastest of them on as many hosts as it takes."""
    parts = made.groups or [made]
    totals: dict[tuple[int, int], float] = {}
    loads = sum(p.load_seconds for p in parts)
    factors = [_factor(p) for p in parts]
    for key in {(c.num_ctx, c.concurrency) for c in parts[0].candidates}:
        found = [next((c for c in p.candidates if (c.num_ctx, c.concurrency) == key), None) for p in parts]
        if all(c is not None for c in found):
            totals[key] = sum(c.seconds * f for c, f in zip(found, factors, strict=True) if c) / hosts
    ranked = sorted((seconds + loads, key) for key, seconds in totals.items())
    meets = [DeadlineOption(num_ctx=n, concurrency=c, hosts=hosts, seconds=round(t, 1))
             for t, (n, c) in ranked if t <= window][:OPTIONS]
    if meets or not ranked or window <= loads:
        return meets
    fastest, (n, c) = ranked[0]
    more = math.ceil(hosts * (fastest - loads) / (window - loads))
    return [DeadlineOption(num_ctx=n, concurrency=c, hosts=more,
                           seconds=round((fastest - loads) * hosts / more + loads, 1))]


def plan(made: DurationEstimate | None, window: float, *, hosts: int = 1, why: str = "") -> DeadlinePlan:
    """The plan of a batch with ``window`` seconds to finish, estimated as ``made`` (None: no estimate, ``why``)
    for ``hosts`` engine hosts (an estimate is one host's: 1)."""
    if made is None:
        return DeadlinePlan(window_seconds=window, message=f"no estimate to compare with the {_clock(window)} window"
                                                           f"{': ' + why if why else ''}")
    meets = _options(made, window, max(1, hosts))
    miss = max(0.0, made.seconds - window)
    certain = made.low > window
    if not miss:
        message = (f"expected to finish in {_clock(made.seconds)} [{_clock(made.low)}, {_clock(made.high)}], "
                   f"within its {_clock(window)} window")
        if made.high > window:
            message += f" (the estimate's upper bound is past it by {_clock(made.high - window)})"
    else:
        message = (f"expected to miss its {_clock(window)} window by {_clock(miss)}: estimated "
                   f"{_clock(made.seconds)} [{_clock(made.low)}, {_clock(made.high)}]")
        message += "; even the lower bound is past it" if certain else ""
        message += "; the lines still running at the window's end expire"
    if miss and meets:
        message += "; would meet it: " + " or ".join(
            f"num_ctx {o.num_ctx}, concurrency {o.concurrency}"
            f"{f' on {o.hosts} hosts like this one' if o.hosts > 1 else ''} (~{_clock(o.seconds)})" for o in meets)
    elif miss:
        message += "; no configuration the sweep measured meets it"
    return DeadlinePlan(window_seconds=window, seconds=made.seconds, low=made.low, high=made.high,
                        expected_miss=miss > 0, certain_miss=certain, miss_seconds=round(miss, 1), meets=meets,
                        message=message)


def strict(metadata: dict[str, str] | None) -> bool:
    """The batch's ``obatch_strict_window`` metadata value; a bad one is refused."""
    value = (metadata or {}).get(STRICT_KEY)
    if value is None:
        return False
    if value not in ("true", "false"):
        raise errors.ConfigError(f"metadata {STRICT_KEY} must be 'true' or 'false'; got {value[:32]!r}.",
                                 code="invalid_value", param=f"metadata.{STRICT_KEY}")
    return value == "true"


def refuse_if_certain(made: DeadlinePlan) -> None:
    """``--strict-window``: a batch whose estimate's lower bound is past its window is refused, in words."""
    if made.certain_miss:
        raise errors.ConfigError(f"The batch cannot finish within its completion_window: {made.message}. Give it a "
                                 "longer window, or run it without the strict window check.",
                                 code="completion_window_too_short", param="completion_window")


async def plan_for_file(session: AsyncSession, engine: Pool, file: Path, window: float, *,
                        file_sha256: str | None = None, model: str | None = None, concurrency: int | None = None,
                        schedule: str = "auto", owner: str = "") -> DeadlinePlan:
    """The plan of a batch of ``file`` about to be created on ``engine``'s hosts for ``owner`` (whose pilot lines
    count): its estimate (the one the estimate endpoint gives the file at this concurrency and schedule) against
    ``window``. Advice: without benchmark points, or when the estimate takes over ``PLAN_SECONDS``, the plan says so
    and the batch goes on."""
    if not await bench_repo.list_points(session, models=[model] if model else None) and \
            not (file_sha256 and await pilots.all_of(session, owner, file_sha256)):  # before the file is read
        return plan(None, window, why="no benchmark points (run `obatch bench`) and no pilot of the file")
    request = EstimateRequest(backend=engine.name, engine=engine, file=file, file_sha256=file_sha256, model=model,
                              concurrency=concurrency, schedule=schedule, owner=owner)
    try:
        async with asyncio.timeout(PLAN_SECONDS):
            parts = await estimate_groups(session, request)
    except errors.ObatchError as e:
        return plan(None, window, why=e.message)
    except TimeoutError:
        return plan(None, window, why=f"the estimate took longer than {PLAN_SECONDS:.0f} s")
    except Exception:  # advice: a failure to estimate must not fail the batch's creation
        log.warning("could not estimate %s for its completion_window", file.name, exc_info=True)
        return plan(None, window, why="the estimate failed (the server's log says why)")
    made = DurationEstimate.of_groups([DurationEstimate.model_validate(p.as_dict()) for p in parts])
    return plan(made, window)


async def plan_batch(svc: Services, source: FileRow, completion_window: str, *, model: str | None,
                     concurrency: int | None, schedule: str) -> DeadlinePlan:
    """The plan of a batch about to be made of the stored file ``source``: ``plan_for_file`` on the services'
    engine hosts, for the file's owner, against the window ``completion_window`` spells."""
    window = window_seconds(completion_window, minimum=svc.settings.min_completion_window)
    async with svc.sessions() as session:
        return await plan_for_file(session, svc.pool, file_path(svc.settings, source.id), window,
                                   file_sha256=source.sha256 or None, model=model, concurrency=concurrency,
                                   schedule=schedule, owner=source.owner)
