"""Prefix groups and the scheduler: groups found at import, one group per lane, no starvation, affinity across a
host failing, the file's order kept on request, the longest lines first.

The engine is the Ollama simulator with its per-slot prompt cache (a request takes the free slot whose last prompt
shares the longest prefix with its own), so what affinity saves shows in its ``cached_prompt_tokens``. A wrapper
backend records which line each request was and when it ran.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import openai
import orjson
import pytest
from openai import OpenAI

from obatch.api import run_batch_file
from obatch.backends import open_backend
from obatch.backends.base import Backend, BackendWrapper, Result, Timings, timings_from_llamacpp
from obatch.backends.pool import Host, Pool
from obatch.batches import batch_object
from obatch.concurrency import AutoLimit, FixedLimit
from obatch.config import Settings
from obatch.prefix import PREFIX_CHARS, prefix_key
from obatch.runner import Job
from obatch.schedule import QUANTUM, Scheduler, Stats
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import checks_held, jsonl, write_jsonl
from tests.serverkit import FINAL, KEYS, ServerProcess

MARK = re.compile(r"\[(\S+)\]$")


def document(d: int, size: int = 1600) -> str:
    rng = random.Random(d)
    return f"Document {d}: " + " ".join(f"word{rng.randrange(10_000)}" for _ in range(size // 9))


def line(custom_id: str, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    messages[-1]["content"] += f" [{custom_id}]"  # the recorder reads the line back from here
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "llama3.2:1b", "messages": messages, "max_tokens": 4, **body}}


def documents_lines(docs: int, questions: int, *, seed: int = 1) -> list[dict[str, Any]]:
    """``docs`` documents × ``questions`` questions each, shuffled; custom_id ``d{doc}-q{question}``."""
    lines = [line(f"d{d}-q{q}", [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": f"{document(d)}\n\nQuestion {q}?"}])
             for d in range(docs) for q in range(questions)]
    random.Random(seed).shuffle(lines)
    return lines


class Recorder:
    """Wraps each host's backend: the custom_id of every request, in the order they started, and where a request
    started while another of its document was in flight."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.hosts: dict[str, str] = {}  # custom_id -> the host that answered it
        self.inflight: Counter[str] = Counter()
        self.doubled: list[int] = []  # positions in ``started``

    def wrap(self, inner: Backend) -> Backend:
        recorder = self

        class Recorded(BackendWrapper):
            async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                               stream: bool = False) -> Result:
                match = MARK.search(body["messages"][-1]["content"])
                assert match is not None
                custom_id = match.group(1)
                group = custom_id.split("-")[0]
                recorder.started.append(custom_id)
                if recorder.inflight[group]:
                    recorder.doubled.append(len(recorder.started) - 1)
                recorder.inflight[group] += 1
                try:
                    result = await self.inner.complete(url, body, num_ctx=num_ctx, stream=stream)
                finally:
                    recorder.inflight[group] -= 1
                recorder.hosts[custom_id] = getattr(self.inner, "url", "")
                return result

            def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> Any:
                return self.inner.stream_chat(body, num_ctx=num_ctx)

        return cast(Backend, Recorded(inner))


async def run(path: Path, settings: Settings, recorder: Recorder, **options: Any) -> Any:
    backend = await open_backend(settings)
    wrapped = backend.mapped(recorder.wrap) if isinstance(backend, Pool) else recorder.wrap(backend)
    try:
        return await run_batch_file(path, settings=settings, backend=wrapped, progress=False, **options)
    finally:
        await backend.aclose()


async def run_on_sim(tmp_path: Path, path: Path, make_settings: Callable[..., Settings], config: SimConfig,
                     schedule: str) -> tuple[Any, Recorder, OllamaSim]:
    """One run of ``path`` at the simulator's slots as its fixed level, on a fresh simulator and store."""
    recorder = Recorder()
    async with OllamaSim(config) as sim:
        report = await run(path, make_settings(sim.url, concurrency=config.num_parallel,
                                               data_dir=tmp_path / schedule), recorder, schedule=schedule)
    return report, recorder, sim


def output_ids(path: Path) -> Counter[str]:
    return Counter(orjson.loads(row)["custom_id"] for row in path.read_bytes().splitlines())


def cached_share(*sims: OllamaSim) -> float:
    return sum(s.stats.cached_prompt_tokens for s in sims) / max(sum(s.stats.prompt_tokens for s in sims), 1)


# ----------------------------------------------------------------------------------------------- prefix keys


def test_lines_sharing_a_long_leading_prefix_share_a_key() -> None:
    def chat(*contents: str) -> dict[str, Any]:
        return {"messages": [{"role": "system", "content": contents[0]},
                             *({"role": "user", "content": c} for c in contents[1:])]}

    url = "/v1/chat/completions"
    same = {prefix_key(url, chat("Be brief.", f"{document(1)}\nQuestion {q}?")) for q in range(5)}
    assert len(same) == 1 and None not in same
    assert prefix_key(url, chat("Be brief.", f"{document(2)}\nQuestion 0?")) not in same
    assert prefix_key(url, chat("Be brief.", "A short question?")) is None  # nothing long enough to share
    rubric = "x" * PREFIX_CHARS  # a long system message alone makes the group, whatever follows
    assert prefix_key(url, chat(rubric, "one")) == prefix_key(url, chat(rubric, "two")) is not None
    assert prefix_key(url, chat("Be brief!", f"{document(1)}\nQuestion 0?")) not in same  # any change up front
    assert prefix_key("/v1/completions", {"prompt": document(1) + "A"}) == \
        prefix_key("/v1/completions", {"prompt": document(1) + "B"}) is not None
    assert prefix_key("/v1/embeddings", {"input": document(1)}) is None


# ------------------------------------------------------------------------------- the scheduler on its own


def fake_host(level: int) -> Host:
    return Host(backend=cast(Backend, None), limit=FixedLimit(level))


def scheduler_over(groups: dict[int | None, int], **options: Any) -> tuple[Scheduler, dict[int, int | None]]:
    """A scheduler over lines numbered in file order: ``groups`` maps a key (None: no group) to its line count."""
    keys: list[tuple[int, int | None, int, int | None]] = []
    group_of: dict[int, int | None] = {}
    for key, count in groups.items():
        for _ in range(count):
            keys.append((len(keys) + 1, key, 16, None))
            group_of[len(keys)] = key

    async def fetch(lines: Sequence[int]) -> list[Job]:
        return [Job(n, f"r{n}", "/v1/chat/completions", {}) for n in lines]

    scheduler = Scheduler(fetch, **options)
    scheduler.add(keys)
    return scheduler, group_of


async def drive(scheduler: Scheduler, host: Host, lanes: int) -> list[int]:
    """Run every line with ``lanes`` in flight, the oldest finishing first; the lines in the order they started."""
    started: list[int] = []
    running: list[Job] = []
    while True:
        while len(running) < lanes:
            job = await scheduler.next(host)
            if job is None:
                break
            running.append(job)
            started.append(job.line)
        if not running:
            return started
        scheduler.finished(running.pop(0), None)


async def test_a_big_group_does_not_starve_a_small_one() -> None:
    scheduler, group_of = scheduler_over({1: 10_000, 2: 50})
    order = await drive(scheduler, fake_host(2), lanes=2)
    assert sorted(order) == list(range(1, 10_051))  # every line once
    small = [i for i, n in enumerate(order) if group_of[n] == 2]
    assert small[-1] < 100  # the small group ran beside the big one from the start, on the other lane

    scheduler, group_of = scheduler_over({1: 10_000, 2: 50})
    order = await drive(scheduler, fake_host(1), lanes=1)  # one lane: the groups take turns
    small = [i for i, n in enumerate(order) if group_of[n] == 2]
    assert small[0] <= QUANTUM and small[-1] < 3 * QUANTUM + 50


async def test_each_lane_holds_one_group_and_lines_of_no_group_fill_the_gaps() -> None:
    scheduler, group_of = scheduler_over({1: 40, 2: 40, 3: 40, None: 10})
    host = fake_host(3)
    order = await drive(scheduler, host, lanes=3)
    assert sorted(order) == list(range(1, 131))
    # with three lanes and three groups, each group's lines run one after another on their lane, so the first
    # three lines started are one of each group, and the lines of no group run once the groups are done
    assert {group_of[n] for n in order[:3]} == {1, 2, 3}
    assert all(group_of[n] is None for n in order[-10:])


async def test_a_freed_slot_goes_to_the_group_whose_request_ended_last_and_surplus_lanes_go_longest_idle_first(
        ) -> None:
    scheduler, group_of = scheduler_over({1: 10, 2: 10, 3: 10})
    host = fake_host(3)
    first = [await scheduler.next(host) for _ in range(3)]
    assert all(job is not None for job in first)
    by_group = {group_of[job.line]: job for job in first if job is not None}
    assert set(by_group) == {1, 2, 3}
    # all three end (a level paused, say), group 3's last: the engine's free slot that held it last is the one a
    # request sent now is most likely to get, so the next line is group 3's
    for group in (1, 2, 3):
        scheduler.finished(by_group[group], None)
    job = await scheduler.next(host)
    assert job is not None and group_of[job.line] == 3
    # the level drops to 2: of the idle lanes the one idle longest (group 1's) gives its group back
    host.limit = FixedLimit(2)
    job = await scheduler.next(host)
    assert job is not None and group_of[job.line] == 2
    held = {lane.group.key for lane in scheduler._lanes[host] if lane.group is not None}
    assert held == {2, 3}, held


async def test_lanes_of_a_host_that_went_down_give_their_groups_back() -> None:
    scheduler, group_of = scheduler_over({1: 60, 2: 60})
    a, b = fake_host(1), fake_host(1)
    first = await scheduler.next(a)
    second = await scheduler.next(b)
    assert first is not None and second is not None and group_of[first.line] != group_of[second.line]
    scheduler.finished(first, None)
    a.up = False  # a's group moves to b's next free slot once b's own group ends or takes its turn
    scheduler.finished(second, None)
    ran = []
    for _ in range(40):
        job = await scheduler.next(b)
        assert job is not None
        ran.append(group_of[job.line])
        scheduler.finished(job, None)
    assert ran[:QUANTUM - 1] == [group_of[second.line]] * (QUANTUM - 1)  # b's own group first, for its turn
    assert group_of[first.line] in ran  # then a's


async def test_longest_first_within_a_group_and_among_lines_of_no_group() -> None:
    keys = [(1, None, 8, None), (2, None, 512, None), (3, None, 8, None), (4, None, 256, None), (5, 7, 8, None),
            (6, 7, 300, None), (7, 7, 8, None), (8, None, 900, 64), (9, None, 900, 8192), (10, None, 900, 64)]

    async def fetch(lines: Sequence[int]) -> list[Job]:
        return [Job(n, f"r{n}", "/v1/chat/completions", {}) for n in lines]

    scheduler = Scheduler(fetch)
    scheduler.add(keys)
    order = await drive(scheduler, fake_host(1), lanes=1)
    assert order == [6, 5, 7, 2, 4, 1, 3, 8, 10, 9]  # lines with a num_ctx of their own last, by context


# -------------------------------------------------------------------------------------- on the simulator


@pytest.fixture
def cache_config() -> Callable[..., SimConfig]:
    def build(slots: int) -> SimConfig:
        return SimConfig(num_parallel=slots, prompt_cache=True, prompt_tps_shared=True, prompt_tps=40_000,
                         decode_tps=2_000)

    return build


async def test_groups_found_at_import_and_recorded_on_the_batch(
        tmp_path: Path, make_settings: Callable[..., Settings], cache_config: Callable[..., SimConfig]) -> None:
    lines = documents_lines(4, 6) + [line(f"s{i}-q0", [{"role": "user", "content": "Hi"}]) for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(cache_config(4)) as sim:
        report = await run(path, make_settings(sim.url, concurrency=4), Recorder())
    assert report.batch.completed == len(lines)
    schedule = batch_object(report.batch).obatch.schedule
    assert schedule["schedule"] == "auto" and schedule["groups"] == 4 and schedule["grouped_lines"] == 24
    assert schedule["lines"] == len(lines) and schedule["answered_lines"] == len(lines)
    assert schedule["cached_prompt_share"] is None  # Ollama counts every prompt token as evaluated: unknown


async def test_one_group_per_slot_and_the_cache_pays(
        tmp_path: Path, make_settings: Callable[..., Settings], cache_config: Callable[..., SimConfig]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", documents_lines(8, 6))
    shares = {}
    for schedule in ("auto", "file"):
        report, recorder, sim = await run_on_sim(tmp_path, path, make_settings, cache_config(4), schedule)
        assert output_ids(report.output) == Counter({line["custom_id"]: 1 for line in documents_lines(8, 6)})
        shares[schedule] = cached_share(sim)
        if schedule == "auto":  # 8 groups over 4 lanes: one line of a document at a time while groups wait (at
            # the end, fewer groups than lanes are left, and the idle lanes help them)
            groups = [cid.split("-")[0] for cid in recorder.started]
            last_first = max(groups.index(g) for g in set(groups))
            assert all(p > last_first for p in recorder.doubled), (recorder.doubled, last_first)
    assert shares["auto"] > 0.7 and shares["auto"] > shares["file"] + 0.3, shares


async def test_affinity_survives_a_host_failing_and_every_line_runs_once(
        tmp_path: Path, make_settings: Callable[..., Settings], cache_config: Callable[..., SimConfig]) -> None:
    lines = documents_lines(6, 20)
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    recorder = Recorder()
    async with OllamaSim(cache_config(2)) as keeper:
        doomed = OllamaSim(cache_config(2))
        await doomed.start()
        settings = make_settings(f"{keeper.url},{doomed.url}", concurrency=2, max_attempts=6)
        task = asyncio.create_task(run(path, settings, recorder))
        while doomed.stats.served < 15:  # noqa: ASYNC110 (polling the simulator's counters)
            await asyncio.sleep(0.01)
        before = dict(recorder.hosts)
        await doomed.stop()
        report = await task
    assert report.batch.completed == len(lines) and report.batch.failed == 0
    assert output_ids(report.output) == Counter({line["custom_id"]: 1 for line in lines})
    moved = {cid.split("-")[0] for cid, host in before.items() if host == doomed.url}
    finished_on = defaultdict(set)
    for cid, host in recorder.hosts.items():
        finished_on[cid.split("-")[0]].add(host)
    assert moved and all(keeper.url in finished_on[group] for group in moved)  # its groups went on elsewhere
    assert cached_share(keeper) > 0.6  # and stayed together there


async def test_schedule_file_keeps_the_files_order(
        tmp_path: Path, make_settings: Callable[..., Settings], cache_config: Callable[..., SimConfig]) -> None:
    lines = documents_lines(3, 5)
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    orders = {}
    for schedule in ("file", "auto"):
        report, recorder, _ = await run_on_sim(tmp_path, path, make_settings, cache_config(1), schedule)
        assert batch_object(report.batch).obatch.schedule["schedule"] == schedule
        orders[schedule] = recorder.started
    assert orders["file"] == [line["custom_id"] for line in lines]
    groups = [cid.split("-")[0] for cid in orders["auto"]]
    assert sum(a != b for a, b in itertools.pairwise(groups)) == 2  # each document's lines together


def test_lookahead_is_a_few_integers_a_line() -> None:
    scheduler, _ = scheduler_over({None: 1000, **dict.fromkeys(range(1, 201), 4)})
    held = [scheduler._loose.lines, *(g.lines for waiting in scheduler._waiting.values() for g in waiting)]
    assert all(isinstance(lines, array) and lines.itemsize == 8 for lines in held)
    assert sum(len(lines) for lines in held) == 1800


async def test_lines_of_no_group_keep_the_files_order_while_auto_concurrency_still_climbs() -> None:
    keys = [(1, None, 8, None), (2, None, 512, None), (3, None, 8, None), (4, None, 256, None)]

    async def fetch(lines: Sequence[int]) -> list[Job]:
        return [Job(n, f"r{n}", "/v1/chat/completions", {}) for n in lines]

    scheduler = Scheduler(fetch, page=1)
    scheduler.add(keys)
    climbing = Host(backend=cast(Backend, None), limit=AutoLimit())  # long lines first would slow its climb
    assert not climbing.limit.settled
    first = await scheduler.next(climbing)
    assert first is not None and first.line == 1
    scheduler.finished(first, None)
    settled = fake_host(1)
    rest = await drive(scheduler, settled, lanes=1)
    assert rest == [2, 4, 3]


def test_a_server_batch_takes_its_schedule(obatch_server: ServerProcess) -> None:
    with OpenAI(base_url=obatch_server.v1, api_key=KEYS["alice"], max_retries=0, timeout=30) as client:
        uploaded = client.files.create(file=("in.jsonl", jsonl(documents_lines(2, 3))), purpose="batch")
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_body={"schedule": "random"})
        created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", extra_body={"schedule": "file"})
        deadline = time.monotonic() + 30
        while (done := client.batches.retrieve(created.id)).status not in FINAL and time.monotonic() < deadline:
            time.sleep(0.1)
    assert done.status == "completed"
    schedule = done.to_dict()["obatch"]["schedule"]
    assert (schedule["schedule"], schedule["groups"], schedule["grouped_lines"]) == ("file", 2, 6)


def test_the_cache_share_is_the_engines_own_figure_or_unknown() -> None:
    stats = Stats()
    llamacpp = Result({"usage": {"prompt_tokens": 1500}},
                      timings_from_llamacpp({"cache_n": 1200, "prompt_n": 300, "predicted_n": 8}))
    stats.observe(llamacpp)
    assert stats.as_dict()["cached_prompt_share"] == 0.8
    ollama = Result({"usage": {"prompt_tokens": 1500}}, Timings(prompt_tokens=1500, completion_tokens=8))
    stats.observe(ollama)  # tells nothing of its cache: not counted as a miss
    assert stats.as_dict()["cached_prompt_share"] == 0.8 and stats.as_dict()["answered_lines"] == 2
    silent = Stats()
    silent.observe(ollama)
    assert silent.as_dict()["cached_prompt_share"] is None
    resumed = Stats()
    resumed.add_reports(stats.as_dict())
    assert resumed.as_dict()["cached_prompt_share"] == 0.8


async def test_auto_concurrency_finds_ollamas_slots_and_keeps_one_group_per_lane(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    # Ollama tells no slot count; its durations show requests waiting for a slot once auto is above the 4 slots
    config = SimConfig(num_parallel=4, prompt_cache=True, prompt_tps_shared=True, prompt_tps=8_000, decode_tps=40)
    lines = documents_lines(4, 48)  # room for a check of a ceiling read low
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    recorder = Recorder()
    async with OllamaSim(config) as sim:
        backend = await open_backend(make_settings(sim.url, concurrency="auto"))
        wrapped = Pool([recorder.wrap(backend)], concurrency="auto")
        try:
            report = await run_batch_file(path, settings=make_settings(sim.url, concurrency="auto"),
                                          backend=wrapped, progress=False)
        finally:
            await backend.aclose()
    assert output_ids(report.output) == Counter({line["custom_id"]: 1 for line in lines})
    limit = wrapped.hosts[0].limit
    assert isinstance(limit, AutoLimit) and limit.ceiling == 4, limit.history  # the slots, counted before a line
    assert "counted" in limit.history[0].reason, limit.history
    learnt = 0
    if limit.history[0].level < 4:  # the count read fewer at once than ran (a loaded machine): a check fixed it
        learnt = next(i for i, c in enumerate(limit.history) if c.reason.startswith("raised the ceiling to 4"))
    assert limit.history[learnt].level == 4, limit.history
    checks_held(limit.history[learnt:], 4)  # above the slots, only a rare check one above them
    assert sim.stats.max_queued_seen > 0  # the count did go above them, to find them
    # after the search each document stays on its lane: only the first rounds miss the cache
    assert cached_share(sim) > 0.65, cached_share(sim)


async def test_a_check_one_above_the_level_costs_its_own_lane_not_a_round_robin_of_cache_misses() -> None:
    # 8 groups on 8 slots; once, auto's check of the slots sends a 9th request and the level is back at 8 as it
    # starts. An engine model like Ollama's: a request takes a free slot that holds its group, else the one freed
    # longest ago, else it queues and takes the next slot to free. A request on a slot that held another group misses.
    scheduler, group_of = scheduler_over(dict.fromkeys(range(1, 9), 60))
    host = fake_host(8)
    held: list[int | None] = [None] * 8
    free = list(range(8))
    running: list[tuple[Job, int]] = []  # (job, slot), the oldest ending first
    queued: list[Job] = []
    misses: list[int] = []  # how many requests had started when each miss happened
    started = 0

    def place(job: Job, slot: int) -> None:
        if held[slot] != group_of[job.line]:
            misses.append(started)
        held[slot] = group_of[job.line]
        running.append((job, slot))

    def send(job: Job) -> None:
        nonlocal started
        started += 1
        if not free:
            queued.append(job)
            return
        slot = next((s for s in free if held[s] == group_of[job.line]), free[0])
        free.remove(slot)
        place(job, slot)

    while True:
        while len(running) + len(queued) < host.limit.level and (job := await scheduler.next(host)) is not None:
            send(job)
        if started == 200:  # the check
            host.limit = FixedLimit(9)
            job = await scheduler.next(host)
            assert job is not None
            send(job)
            host.limit = FixedLimit(8)
        if not running:
            break
        job, slot = running.pop(0)
        scheduler.finished(job, None)
        if queued:
            place(queued.pop(0), slot)
        else:
            free.append(slot)
    assert started == 480 and not queued
    after = [n for n in misses if n > 8]  # the first 8 found the slots cold
    assert len(after) <= 2, misses  # the check's own request, and the group whose slot it took
