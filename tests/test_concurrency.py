"""Auto concurrency: the level settles at the engine's width, backs off when the engine is busy or slows down.

The first tests drive ``AutoLimit`` through a discrete-event model of an engine (``slots`` requests served at once,
each taking ``service`` seconds, a FIFO queue of ``max_queue`` beyond them, 503 past that) on a virtual clock, so they
are exact and fast; the last ones run it against the Ollama simulator on loopback.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from obatch.api import run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.backends.pool import Pool
from obatch.concurrency import AutoLimit, FixedLimit, make_limit, overlap, queued
from obatch.config import Settings
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import chat_line, checks_held, write_jsonl


def simulate(limit: AutoLimit, clock: list[float], *, slots: int, service: Callable[[float], float],
             requests: int, max_queue: int = 10_000, timed: bool = False,
             starts: list[float] | None = None,
             told: Callable[[float, float], float] | None = None) -> tuple[list[tuple[float, int]], int]:
    """Run ``requests`` through a model engine under ``limit``; (completion times with levels, 503s). ``timed``:
    the engine tells how long it worked on each request (as Ollama does), the rest of the latency being its queue;
    ``told(ended, worked)``: the seconds it tells instead of those it worked (an engine whose durations leave out
    some of its work, or a client that reads the answer late)."""
    events: list[tuple[float, int, int, float, int]] = []  # (time, seq, kind 0=finish, start time, epoch)
    served_at: dict[int, float] = {}  # seq -> when a slot took it
    queue: deque[tuple[float, int]] = deque()
    busy = in_flight = issued = seq = busy_503 = 0
    done: list[tuple[float, int]] = []

    def serve(started: float, epoch: int) -> None:
        nonlocal busy, seq
        busy += 1
        seq += 1
        served_at[seq] = clock[0]
        heapq.heappush(events, (clock[0] + service(clock[0]), seq, 0, started, epoch))

    def issue() -> None:
        nonlocal in_flight, issued, busy_503
        while in_flight < limit.admit and issued < requests:
            epoch = limit.begin()
            if starts is not None:
                starts.append(clock[0])
            issued += 1
            if busy < slots:
                in_flight += 1
                serve(clock[0], epoch)
            elif len(queue) < max_queue:
                in_flight += 1
                queue.append((clock[0], epoch))
            else:
                busy_503 += 1
                issued -= 1  # retried later
                limit.done(epoch, work=0.0, latency=0.0, overloaded=True)
                if in_flight == 0:
                    break
                return

    issue()
    while events:
        at, n, _, started, epoch = heapq.heappop(events)
        clock[0] = at
        busy -= 1
        in_flight -= 1
        worked = at - served_at.pop(n)
        limit.done(epoch, work=1.0, latency=at - started,
                   engine=(told(at, worked) if told is not None else worked) if timed else None)
        done.append((at, limit.level))
        if queue:
            queued_at, queued_epoch = queue.popleft()
            serve(queued_at, queued_epoch)
        issue()
    return done, busy_503


def throughput(done: list[tuple[float, int]], start: float) -> float:
    tail = [t for t, _ in done if t >= start]
    return (len(tail) - 1) / (tail[-1] - tail[0])


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 24])
def test_auto_settles_at_the_engines_width_without_losing_throughput(slots: int) -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    done, _ = simulate(limit, clock, slots=slots, service=lambda _: 1.0, requests=400 * slots)
    assert slots <= limit.level <= 2 * slots, limit.history
    # after the search, the engine is kept busy: its best throughput is `slots` requests per second
    assert throughput(done, done[len(done) // 2][0]) >= 0.95 * slots
    assert limit.history[0].reason.startswith("start")
    assert any(c.reason.startswith("kept") for c in limit.history), limit.history


@pytest.mark.parametrize("slots", [1, 3, 8, 24])
def test_an_engine_that_tells_its_processing_time_shows_its_slots_and_goes_above_only_to_check(slots: int) -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    starts: list[float] = []
    done, _ = simulate(limit, clock, slots=slots, service=lambda _: 1.0, requests=200 * slots, timed=True,
                       starts=starts)
    assert "jumped" in limit.history[1].reason and limit.history[1].level == 16, limit.history
    learnt = next(i for i, c in enumerate(limit.history) if "waited inside the engine" in c.reason)
    assert limit.history[learnt].level == slots and limit.ceiling == slots, limit.history
    if learnt == 2:  # the jump's burst told: nothing started between its first answer and the drop to the slots
        jumped, told = limit.history[1].at, limit.history[2].at
        assert not [t for t in starts if jumped < t < told], (starts, limit.history)
    checks_held(limit.history[learnt:], slots)  # above the slots only a rare check, one step, and back
    assert limit.level == slots or "once above the slots read" in limit.reason, limit.history  # (a check at the end)
    # the search is over within the first few rounds, and the engine is busy from then on
    found = next(i for i, (_, level) in enumerate(done) if level == slots)
    assert found <= 4 * max(slots, 16), (found, limit.history)
    assert throughput(done, done[found][0]) >= 0.95 * slots


def test_slots_read_low_at_the_jump_are_found_by_a_later_check() -> None:
    # 4 slots; during the jump's burst the engine tells under a third of the time it works on each request (as a
    # loaded machine's engine or client does), so the burst reads fewer requests at once than it ran
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    durations = itertools.cycle([1.0, 1.3, 0.9, 1.2, 1.1])
    done, _ = simulate(limit, clock, slots=4, service=lambda _: next(durations), requests=1500, timed=True,
                       told=lambda ended, worked: 0.3 * worked if ended < 12 else worked)
    reasons = [c.reason for c in limit.history]
    learnt = next(i for i, r in enumerate(reasons) if "waited inside the engine" in r)
    assert reasons[learnt].startswith("kept 3:"), limit.history  # the reading this is about: one slot short
    raised = next(i for i, r in enumerate(reasons) if r.startswith("raised the ceiling to 4"))
    assert limit.history[raised - 1].level == 4 and "once above the slots read" in reasons[raised - 1]
    assert all(c.level <= 3 for c in limit.history[learnt:raised - 1]), limit.history  # held until the check
    assert limit.ceiling == 4 and limit.level == 4, limit.history
    checks_held(limit.history[raised:], 4)
    # from the check on, the engine's 4 slots are busy: within 5% of its best
    assert throughput(done, limit.history[raised].at) >= 0.95 * 4 / 1.1


def test_slots_read_right_are_checked_rarely_and_kept() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    starts: list[float] = []
    done, _ = simulate(limit, clock, slots=4, service=lambda _: 1.0, requests=2000, timed=True, starts=starts)
    learnt = next(i for i, c in enumerate(limit.history) if "waited inside the engine" in c.reason)
    assert limit.history[learnt].level == 4, limit.history
    began = checks_held(limit.history[learnt:], 4)
    assert 3 <= len(began) <= 6, limit.history  # 500 rounds: a few checks, each hold twice the last
    # each check is one request above the slots, with no queue behind it: a fifth in flight once per check
    ended = sorted(t for t, _ in done)
    settled = [t for t in starts if t > limit.history[learnt].at]
    fifth = [t for i, t in enumerate(settled)
             if len(starts) - len(settled) + i + 1 - bisect.bisect_right(ended, t) > 4]
    assert len(fifth) == len(began), (fifth, began)
    assert limit.ceiling == 4 and limit.level == 4
    assert throughput(done, limit.history[learnt].at) >= 0.95 * 4  # the checks cost under 5%


def test_remembered_slots_are_the_start_with_no_request_at_1_and_no_burst() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.recall(8, "an earlier run on http://e:11434 at 2026-12-06 19:00 UTC")
    starts: list[float] = []
    done, _ = simulate(limit, clock, slots=8, service=lambda _: 1.0, requests=400, timed=True, starts=starts)
    first = limit.history[0]
    assert first.level == 8 and first.reason.startswith("start: 8, remembered from an earlier run on http://e:11434")
    assert not any(c.level < 8 or "jumped" in c.reason or "waited" in c.reason for c in limit.history), limit.history
    assert starts[:8] == [0.0] * 8 and starts[8] == 1.0  # 8 at once from the first moment, and never 9 waiting
    checks_held(limit.history, 8)
    assert limit.learnt == 8
    assert throughput(done, 0.0) >= 0.95 * 8


@pytest.mark.parametrize("remembered", [8, 32])
def test_remembered_slots_above_the_engines_are_lowered_by_the_waits(remembered: int) -> None:
    # the engine restarted with 4 slots since the run that read 8 (or 32)
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.recall(remembered, "an earlier run")
    done, _ = simulate(limit, clock, slots=4, service=lambda _: 1.0, requests=800, timed=True)
    lowered = next(i for i, c in enumerate(limit.history) if c.reason.startswith("lowered the ceiling to 4"))
    assert limit.history[lowered].at <= 3.0, limit.history  # within the first rounds
    checks_held(limit.history[lowered:], 4)
    assert limit.ceiling == 4 and limit.learnt == 4
    assert throughput(done, limit.history[lowered].at + 2) >= 0.95 * 4


def test_remembered_slots_below_the_engines_are_raised_by_the_check() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.recall(2, "an earlier run")
    durations = itertools.cycle([1.0, 1.3, 0.9, 1.2, 1.1])  # slots that do not all end together, as on an engine
    simulate(limit, clock, slots=4, service=lambda _: next(durations), requests=1500, timed=True)
    reasons = [c.reason for c in limit.history]
    assert any(r.startswith("raised the ceiling to") for r in reasons), limit.history
    assert limit.ceiling == 4 and limit.level == 4, limit.history


def test_a_reported_width_is_not_overridden_by_a_remembered_one() -> None:
    limit = AutoLimit()
    limit.hint(8, "llama.cpp")
    limit.recall(3, "an earlier run")
    assert limit.level == 8 and limit.ceiling is None and limit.learnt is None
    assert FixedLimit(4).learnt is None


def test_a_wait_counts_only_while_more_requests_were_in_flight_than_the_engine_ran() -> None:
    # 8 sent at once to an engine of 4 slots, 1 s each: the second four waited 1 s with 8 in flight
    burst = [(1.0, 1.0, 1.0)] * 4 + [(2.0, 1.0, 2.0)] * 4
    assert queued(burst, burst) == 4
    # a burst that went out slowly on a loaded machine (the answers of one such run, seconds): at most 3 in flight,
    # and the latency beyond the engine's time is the client's and the engine's own overhead, not a wait for a slot
    slow = [(0.160, 0.160, 0.200), (0.286, 0.112, 0.126), (0.448, 0.158, 0.288), (0.520, 0.156, 0.283),
            (0.670, 0.110, 0.150)]
    assert overlap(slow) == 2  # what the old reading took for the slots
    assert queued(slow, slow) is None


def test_a_probe_above_a_reported_width_ends_once_requests_wait_inside_the_engine() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.hint(8, "llama.cpp")
    simulate(limit, clock, slots=8, service=lambda _: 1.0, requests=800, timed=True)
    probes = [c.level for c in limit.history if c.reason.startswith("raised")]
    assert probes == [10] and limit.ceiling == 8 and limit.level == 8, limit.history


def test_a_reported_width_is_the_start_and_needs_no_search() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.hint(8, "llama.cpp")
    assert limit.level == 8 and limit.reason == "llama.cpp reports 8 parallel slots"
    done, _ = simulate(limit, clock, slots=8, service=lambda _: 1.0, requests=400)
    assert throughput(done, 0.0) >= 0.95 * 8  # full speed from the first request
    assert 8 <= limit.level <= 10


def test_engine_busy_cuts_the_level_at_once() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0)
    limit.hint(64, "test")
    done, busy = simulate(limit, clock, slots=2, max_queue=2, service=lambda _: 1.0, requests=400)
    assert busy > 0 and limit.level <= 4, limit.history  # 2 slots + 2 queued is all the engine takes
    assert any("busy" in c.reason for c in limit.history)
    assert len(done) == 400


def test_latency_inflation_steps_down() -> None:
    clock = [0.0]
    limit = AutoLimit(clock=lambda: clock[0], min_window=0.0, maximum=8)
    # the engine has 8 slots; halfway another tenant makes every request four times slower
    simulate(limit, clock, slots=8, service=lambda now: 1.0 if now < 200 else 4.0, requests=3000)
    assert any("latency" in c.reason for c in limit.history), limit.history


def test_fixed_levels_and_the_default() -> None:
    assert isinstance(make_limit(3), FixedLimit) and make_limit(3).level == 3
    assert isinstance(make_limit("auto"), AutoLimit)
    assert Settings(_env_file=None).concurrency == "auto"  # type: ignore[call-arg]
    assert Settings(_env_file=None, concurrency="7").concurrency == 7  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="concurrency"):
        Settings(_env_file=None, concurrency="lots")  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------ against the simulator


async def test_auto_converges_near_the_simulators_slot_count(tmp_path: Path,
                                                             make_settings: Callable[..., Settings]) -> None:
    # 80 ms a request: the client's own per-request work is noise beside it, as with a real model
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(240)])
    async with OllamaSim(SimConfig(num_parallel=4, decode_tps=200, max_queue=512)) as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url), progress=False)
        assert report.batch.completed == 240 and report.batch.failed == 0
        story = orjson.loads(report.batch.concurrency_json or "{}")
        assert story["mode"] == "auto"
        host = story["hosts"][0]
        assert host["url"] == sim.url
        assert 4 <= host["best"] <= 8, host  # 4 slots; one more request each hides the client's own gaps
        first = host["history"][0]  # Ollama tells no slots: 16 short requests counted them before the first line
        # 4, or fewer where a loaded machine read the first round's answers late (the check above raises it)
        assert 1 <= first["level"] <= 4 and "short requests sent together" in first["reason"], host["history"]
        assert sim.stats.max_concurrent_seen >= 4


async def test_auto_backs_off_on_503_bursts_and_loses_no_line() -> None:
    async with OllamaSim(SimConfig(num_parallel=2, max_queue=2, decode_tps=2000)) as sim:
        backend = OllamaBackend(sim.url)
        pool = Pool([backend])
        pool.hosts[0].limit.hint(32, "test")  # a wrong claim: far more than the engine takes
        outcomes: list[Outcome] = []

        async def jobs() -> object:
            for i in range(200):
                yield Job(i, f"r{i}", "/v1/chat/completions",
                          {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8})

        async def sink(outcome: Outcome) -> None:
            outcomes.append(outcome)

        policy = RetryPolicy(max_attempts=30, initial_wait=0.01, max_wait=0.05, timeout=10)
        await run_jobs(jobs(), pool, sink, policy=policy)  # type: ignore[arg-type]
        await backend.aclose()
    assert sim.stats.busy_503 > 0
    assert sorted(o.job.line for o in outcomes) == list(range(200))
    assert all(o.error is None for o in outcomes)
    limit = pool.hosts[0].limit
    assert limit.level <= 8 and any("busy" in c.reason for c in limit.history), limit.history


def test_auto_is_the_default_of_the_command_line_and_urls_follow_one_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from obatch.cli import _parser, _settings

    for key in [k for k in __import__("os").environ if k.startswith("OBATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    plain = _settings(_parser().parse_args(["run", "in.jsonl"]))
    assert plain.concurrency == "auto"
    assert _settings(_parser().parse_args(["run", "in.jsonl", "-c", "6"])).concurrency == 6
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "in.jsonl", "-c", "many"])
    pooled = _settings(_parser().parse_args(["run", "in.jsonl", "--url", "http://a:11434",
                                             "--url", "http://b:11434,http://c:8000/v1"]))
    assert pooled.ollama_urls == ["http://a:11434", "http://b:11434"]
    assert pooled.openai_base_urls == ["http://c:8000/v1"]
    # the backend named in the environment decides what a bare --url is (it used to become an Ollama URL)
    monkeypatch.setenv("OBATCH_BACKEND", "openai")
    chosen = _settings(_parser().parse_args(["run", "in.jsonl", "--url", "http://engine:8000/v1"]))
    assert chosen.backend == "openai" and chosen.openai_base_urls == ["http://engine:8000/v1"]
    assert chosen.ollama_urls == ["http://127.0.0.1:11434"]
