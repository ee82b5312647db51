"""The live ETA of a running batch (``obatch.progress.LiveEta``): an outage of every engine host pauses it and is
left out of its rate; the start estimate it begins from is moved to the concurrency auto really settled on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from obatch import errors
from obatch.api import run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.backends.pool import Pool
from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.outages import Outages
from obatch.progress import LiveEta, along, prior_levels
from obatch.protocol import BatchEta, DurationEstimate
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from tests.helpers import chat_line, write_jsonl

CHAT = "llama3.2:1b"


# ------------------------------------------------------------------------------------- outages, a fake clock


def test_an_outage_pauses_the_eta_and_is_left_out_of_its_rate() -> None:
    outages = Outages()
    eta = LiveEta({None: 100}, started=0.0, outages=outages)
    for _ in range(20):  # one line a second
        eta.observe(None, 100)
    before = eta.seconds_left(now=20.0)
    assert before == pytest.approx(80.0)
    outages.begin(20.0)
    assert eta.waiting and eta.describe(now=90.0) == "waiting for the engine (eta 1 min 20 s once it answers)"
    during = [eta.seconds_left(now=t) for t in (30.0, 60.0, 120.0)]
    for _ in range(5):  # lines whose retries ran out meanwhile: they leave the work, they are not throughput
        eta.observe(None, None)
        during.append(eta.seconds_left(now=150.0))
    assert all(left is not None and left <= before + 1e-9 for left in during)
    assert during == sorted(during, reverse=True)  # it never grows while it waits
    carried = BatchEta.model_validate(eta.as_dict())
    assert carried.waiting and carried.lines_done == 25 and not carried.model_extra

    outages.end(200.0)  # three minutes down
    for _ in range(10):
        eta.observe(None, 100)
    left = eta.seconds_left(now=210.0)  # 30 lines in 30 s of engine time; 65 left
    assert not eta.waiting and left == pytest.approx(65.0)
    assert eta.elapsed(210.0) == pytest.approx(30.0)
    counted = LiveEta({None: 100}, started=0.0)  # the same lines with the outage counted as running time
    for _ in range(30):
        counted.observe(None, 100)
    assert (counted.seconds_left(now=210.0) or 0) > 6 * left
    assert eta.describe(now=210.0) == "eta 1 min 5 s"


def test_outages_add_up_the_time_inside_a_window() -> None:
    outages = Outages()
    outages.begin(10.0)
    outages.begin(12.0)  # still the same outage
    outages.end(15.0)
    outages.begin(14.0)  # a new one cannot start before the last ended
    assert outages.since == 15.0
    outages.end(20.0)
    assert outages.spans == [(10.0, 15.0), (15.0, 20.0)]
    assert outages.within(0.0, 100.0) == 10.0 and outages.within(12.0, 17.0) == 5.0
    outages.begin(30.0)
    assert outages.within(25.0, 40.0) == 10.0 and outages.ongoing


async def test_the_pool_notes_an_outage_only_when_no_host_answers() -> None:
    pool = Pool([OllamaBackend("http://127.0.0.1:9"), OllamaBackend("http://127.0.0.1:10")], concurrency=4)
    refused = errors.TransientError("Connection to the engine failed: refused")
    first, second = pool.hosts
    for host in (first, first, second):
        lease = pool._grant(host)
        lease.release(error=refused)
    assert not pool.outages.ongoing  # the second host failed once: it may have answered the next
    pool._grant(second).release(error=errors.ServerBusyError("busy", status=503))  # busy is an answer
    assert second.silent == 0 and not pool.outages.ongoing
    for _ in range(2):
        pool._grant(second).release(error=errors.BackendTimeout("no answer in time"))
    assert pool.outages.ongoing and pool.outages.since == second.silent_since
    pool._grant(first).release(error=errors.TransientError("engine error", status=500))  # an answer, an error's
    assert not pool.outages.ongoing and len(pool.outages.spans) == 1
    await pool.aclose()


@pytest.mark.timeout(120)
async def test_lines_waiting_out_a_long_backoff_go_on_as_soon_as_the_engine_is_back(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """With retries backing off up to 30 s, an outage held the batch for as long after the engine was back: every
    line waited out its own backoff (here 3 to 6 s, then 6 to 9: 3 to 9 s past the engine's return). The pool asks
    the hosts while none answers; the first answer wakes the waiting lines, and the batch ends within seconds of the
    engine's return, every line once."""
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=4, decode_tps=400)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=8) for i in range(120)])
    sim = OllamaSim(config)
    await sim.start()
    settings = make_settings(sim.url, concurrency=4, max_attempts=50, retry_initial_wait=3.0, retry_max_wait=30.0)
    run = asyncio.create_task(run_batch_file(path, settings=settings, progress=False))
    while sim.stats.served < 20:  # noqa: ASYNC110 (polling the simulator's counters)
        await asyncio.sleep(0.01)
    await sim.stop()
    await asyncio.sleep(6.0)  # the lines in flight fail, back off, fail again, back off longer
    back = OllamaSim(config, port=sim.port)
    await back.start()
    up_at = time.monotonic()
    report = await run
    after = time.monotonic() - up_at
    await back.stop()
    assert report.batch.completed == 120 and report.batch.failed == 0
    assert back.stats.served == 120 - sim.stats.served  # each line answered once across the two engines
    assert after < 5.0, after  # the watch asks every 2 s at most (before: 8.5 s in three runs)


# ---------------------------------------------------------------------------------- the level auto settled on


def _group(concurrency: int, seconds: float, curve: dict[int, float], load: float = 0.0) -> dict[str, Any]:
    return DurationEstimate(
        model=CHAT, num_requests=100, seconds=seconds + load, low=seconds / 2, high=seconds * 2, load_seconds=load,
        num_ctx=2048, concurrency=concurrency,
        candidates=[{"num_ctx": 2048, "concurrency": c, "seconds": t} for c, t in curve.items()]
        + [{"num_ctx": 4096, "concurrency": 16, "seconds": 1.0}]).model_dump(mode="json")


def test_the_start_estimate_moves_to_the_level_auto_settled_on() -> None:
    curve = {1: 100.0, 2: 60.0, 4: 40.0}  # the sweep's running times for this file
    level, levels = prior_levels([_group(2, 66.0, curve, load=5.0)])  # scaled ×1.1 (history, today's speed)
    assert level == 2 and levels == pytest.approx({1: 110.0, 2: 66.0, 4: 44.0})  # the other num_ctx left out
    eta = LiveEta({None: 10}, prior_seconds=66.0, prior_level=level, prior_curve=levels, started=0.0)
    assert eta.seconds_left(now=0.0) == pytest.approx(66.0)  # auto has not settled yet
    eta.level = 4
    assert eta.seconds_left(now=0.0) == pytest.approx(44.0)
    eta.level = 8  # past what the sweep measured: no faster than its highest level
    assert eta.seconds_left(now=0.0) == pytest.approx(44.0)
    eta.level = 3
    assert 44.0 < (eta.seconds_left(now=0.0) or 0) < 66.0
    assert along(curve, 3) == pytest.approx(1 / (0.415 / 60 + 0.585 / 40), rel=1e-2)
    for _ in range(5):  # a few lines at twice the rate the estimate expected at its level
        eta.observe(None, 10)
    eta.level = 4
    within = eta.seconds_left(now=3.0)
    eta.level = 8  # the same running time on the curve (no faster than 4), but nothing measured it
    beyond = eta.seconds_left(now=3.0)
    assert not LiveEta({None: 1}).beyond_the_sweep() and eta.beyond_the_sweep()
    assert within is not None and beyond is not None and beyond < within  # the estimate counts less, lines more
    # two models' groups made for different levels, or none measured: the start estimate stays as it was made
    assert prior_levels([_group(2, 66.0, curve), _group(4, 10.0, curve)]) == (None, {})
    assert prior_levels([_group(2, 66.0, {})]) == (None, {})


def _running_eta(db: Path) -> dict[str, Any] | None:
    """The live ETA a running batch keeps in a SQLite store (None while there is none)."""
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute("SELECT eta_json FROM batches WHERE status = 'in_progress'").fetchone()
    except sqlite3.OperationalError:
        return None
    return orjson.loads(row[0]) if row and row[0] else None


@pytest.mark.timeout(120)
async def test_the_eta_waits_while_the_engine_is_down_and_is_not_inflated_after(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """The engine is stopped for 3 s after a quarter of the batch, then started again on its port: while down
    the batch's ETA says it waits and does not grow; once back it is near the time the batch really took, not
    inflated by the outage (counted as running time, the rate would be about half the engine's)."""
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=4, decode_tps=200)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(240)])
    db = tmp_path / "data" / "obatch.db"
    samples: list[tuple[float, dict[str, Any]]] = []

    async def sample(until: asyncio.Event) -> None:
        while not until.is_set():
            eta = await asyncio.to_thread(_running_eta, db)
            if eta is not None:
                samples.append((time.monotonic(), eta))
            await asyncio.sleep(0.05)

    sim = OllamaSim(config)
    await sim.start()
    settings = make_settings(sim.url, concurrency=4, max_attempts=200, retry_initial_wait=0.05,
                             retry_max_wait=0.2)
    finished = asyncio.Event()
    watcher = asyncio.create_task(sample(finished))
    run = asyncio.create_task(run_batch_file(path, settings=settings, progress=False))
    while sim.stats.served < 60:  # noqa: ASYNC110 (polling the simulator's counters)
        await asyncio.sleep(0.01)
    down_at = time.monotonic()
    await sim.stop()
    await asyncio.sleep(3.0)
    back = OllamaSim(config, port=sim.port)
    await back.start()
    up_at = time.monotonic()
    report = await run
    ended = time.monotonic()
    finished.set()
    await watcher
    await back.stop()

    assert report.batch.completed == 240 and report.batch.failed == 0
    before = [eta for t, eta in samples if t < down_at and not eta["waiting"] and eta["seconds_left"]]
    waiting = [eta for t, eta in samples if eta["waiting"]]
    assert before and len(waiting) >= 10, samples
    assert max(eta["seconds_left"] for eta in waiting) <= before[-1]["seconds_left"] * 1.2
    lefts = [eta["seconds_left"] for eta in waiting]
    assert lefts == sorted(lefts, reverse=True)  # it never grows while it waits
    after = [(t, eta) for t, eta in samples if t > up_at + 0.5 and not eta["waiting"] and eta["lines_left"] > 40]
    assert after, samples
    t, eta = after[0]
    actual = ended - t
    assert eta["outage_seconds"] > 2.0
    # counted as running time, the 3 s outage would have more than doubled it
    assert 0.4 * actual < eta["seconds_left"] < 2.0 * actual, (eta, actual)


# ------------------------------------------------------------------------------- done-means: auto's real level


@pytest.mark.timeout(180)
async def test_an_estimate_under_auto_names_the_level_auto_then_used(make_settings: Callable[..., Settings],
                                                                   tmp_path: Path) -> None:
    """A sweep of an engine of 4 slots at 1, 2, 4 and 8; a batch then run with auto concurrency: the level its
    start estimate named is the level auto settled on, within one of auto's steps (it doubles from 1)."""
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=4, decode_tps=150, default_output_tokens=24)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=24) for i in range(160)])
    async with OllamaSim(config) as sim:
        settings = make_settings(sim.url)
        await run_sweep(SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2, 4, 8], requests=16,
                                  workload="short", seed=1), settings=settings, progress=False)
        report = await run_batch_file(path, settings=settings, concurrency="auto", progress=False)
    assert report.batch.completed == 160
    made = DurationEstimate.stored(report.batch.estimate_json or "")
    assert made is not None and made.concurrency is not None
    [host] = orjson.loads(report.batch.concurrency_json or "{}")["hosts"]
    used = host["best"]
    assert made.concurrency / 2 <= used <= made.concurrency * 2, (made.concurrency, host)
    assert any(f"settle at {made.concurrency}" in note for note in made.notes)


def test_the_ui_waits_when_the_batch_says_no_host_answers() -> None:
    """/health may say the engine is up (its probe passed, or it asks another host) while the batch's own hosts
    do not answer: the batch's ETA says so, and the page shows it waiting."""
    from obatch.ui import views
    from tests.test_ui_views import batch

    running = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 10, "failed": 0},
                    obatch={"eta": {"seconds_left": 30.0, "at": 1015.0, "waiting": True, "outage_seconds": 9.0}})
    progress = views.batch_progress(running, now=1020, engine_up=True)
    assert progress.waiting and progress.eta_s is None
    running.obatch.eta.waiting = False  # type: ignore[union-attr]
    assert views.batch_progress(running, now=1020).eta_s == pytest.approx(25.0)
