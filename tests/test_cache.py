"""The response cache and identical lines run once, against the simulator: what is sent upstream, what each line
gets back (and from where), and exactly once under faults and after SIGKILL."""

from __future__ import annotations

import dataclasses
import io
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from obatch import batches, cache, errors
from obatch.api import results, results_frame, run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.client import Client
from obatch.config import Settings
from obatch.protocol import Batch
from obatch.store.db import open_store
from obatch.store.tables import BatchRow
from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.server import ServerProcess
from tests.helpers import chat_line, killable_run, sigkill_once_done, succeeded_rows, write_jsonl
from tests.serverkit import FINAL, KEYS

MODEL = "llama3.2:1b"
PROVENANCE_COLUMNS = ("host", "engine", "engine_version", "model_digest", "num_ctx", "loaded_context", "seed",
                      "attempts")


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def by_id(*paths: Path) -> dict[str, dict[str, Any]]:
    """Every output and error line by custom_id, checking each appears exactly once."""
    lines = [line for path in paths if path.exists() for line in read_lines(path)]
    counts = Counter(line["custom_id"] for line in lines)
    assert set(counts.values()) <= {1}, [c for c, n in counts.items() if n > 1]
    return {line["custom_id"]: line for line in lines}


def content(line: dict[str, Any]) -> str:
    return str(line["response"]["body"]["choices"][0]["message"]["content"])


def greedy(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return chat_line(custom_id, prompt, temperature=0, max_tokens=8, **body)


def sent(sim: OllamaSim) -> int:
    """The lines' requests the engine received (faults included): chat and embeddings here (the short requests
    that count its slots before a first run go to /api/generate)."""
    return sim.stats.requests["/api/chat"] + sim.stats.requests["/api/embed"]


# ------------------------------------------------------------------------------------------------- keys


def test_the_key_ignores_what_does_not_change_the_answer() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    same = {"user": "u1", "metadata": {"run": "2"}, "stream": False, "store": True, "service_tier": "flex",
            **dict(reversed(body.items()))}
    assert cache.key("/v1/chat/completions", body) == cache.key("/v1/chat/completions", same)
    assert cache.key("/v1/chat/completions", body) != cache.key("/v1/completions", body)
    assert cache.key("/v1/chat/completions", body) != cache.key("/v1/chat/completions", {**body, "max_tokens": 4})
    assert cache.key("/v1/chat/completions", body).startswith("d:")


@pytest.mark.parametrize(("url", "body", "kind"), [
    ("/v1/embeddings", {"input": "x"}, "d"),
    ("/v1/chat/completions", {"temperature": 0}, "d"),
    ("/v1/chat/completions", {"temperature": 0.0, "top_p": 0.5}, "d"),
    ("/v1/responses", {"temperature": 0.7, "seed": 3}, "d"),
    ("/v1/completions", {"seed": 0}, "d"),
    ("/v1/chat/completions", {"options": {"temperature": 0}}, "d"),
    ("/v1/chat/completions", {"options": {"seed": 7, "temperature": 1}}, "d"),
    ("/v1/chat/completions", {"options": {"temperature": 0.5}}, "s"),
    ("/v1/chat/completions", {}, "s"),  # the engine's default temperature samples
    ("/v1/chat/completions", {"temperature": 0.7}, "s"),
    ("/v1/chat/completions", {"temperature": False}, "s"),
])
def test_what_the_body_determines(url: str, body: dict[str, Any], kind: str) -> None:
    assert cache.key(url, {"model": MODEL, **body}).split(":")[0] == kind


def test_policies() -> None:
    assert cache.kinds("auto") == ("d",) and cache.kinds("all") == ("d", "s") and cache.kinds("off") == ()
    assert cache.policy_of("auto", orjson.dumps({"obatch_cache": "off"}).decode()) == "off"
    assert cache.policy_of("all", None) == "all"
    with pytest.raises(errors.ConfigError) as refused:
        cache.check_metadata({"obatch_cache": "sometimes"})
    assert refused.value.param == "metadata.obatch_cache"


# ------------------------------------------------------------------------------------------ notebook / CLI


@pytest.mark.usefixtures("db_url")
async def test_a_rerun_sends_only_the_changed_lines(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    n = 200
    first = [greedy(f"r{i}", f"question {i}") for i in range(n)]
    second = [greedy(f"r{i}", f"question {i}" + (" (reworded)" if i % 10 == 3 else "")) for i in range(n)]
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        one = await run_batch_file(write_jsonl(tmp_path / "a.jsonl", first), settings=settings, progress=False)
        assert sent(sim) == n
        two = await run_batch_file(write_jsonl(tmp_path / "b.jsonl", second), settings=settings, progress=False)
        assert sent(sim) == n + n // 10  # only the changed tenth went upstream
    earlier, later = by_id(one.output), by_id(two.output, two.errors)
    assert len(later) == n and two.batch.completed == n
    assert (one.batch.cached, two.batch.cached) == (0, n - n // 10)
    for i in range(n):
        line = later[f"r{i}"]
        if i % 10 == 3:
            assert line["obatch"]["cached_from"] is None and line["obatch"]["attempts"] >= 1
            continue
        assert line["obatch"]["cached_from"] == {"batch_id": one.batch.id, "custom_id": f"r{i}"}
        assert line["obatch"]["attempts"] == 0 and line["obatch"]["latency_ms"] is None
        assert line["obatch"]["host"] is None  # no host of this batch answered it: the line it names has one
        assert line["response"]["body"] == earlier[f"r{i}"]["response"]["body"]  # the stored answer
        assert line["id"] != earlier[f"r{i}"]["id"]  # a line of its own
    assert two.batch.output_tokens == one.batch.output_tokens - sum(  # usage is what the answers say, reused or not
        earlier[f"r{i}"]["response"]["body"]["usage"]["completion_tokens"] for i in range(3, n, 10)) + sum(
        later[f"r{i}"]["response"]["body"]["usage"]["completion_tokens"] for i in range(3, n, 10))


@pytest.mark.usefixtures("db_url")
async def test_the_notebook_frame_says_where_each_answer_came_from(tmp_path: Path,
                                                                   make_settings: Callable[..., Settings]) -> None:
    """``obatch.run``'s frame (``results_frame``) and ``obatch.results``' carry each line's ``cached_from`` and its
    provenance, as its output line does."""
    prompts = [f"question {i}" for i in range(12)]
    changed = [p + (" (reworded)" if i % 4 == 1 else "") for i, p in enumerate(prompts)]
    defaults = {"temperature": 0, "max_tokens": 8}
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        one = await run_batch_file(prompts, model=MODEL, settings=settings, progress=False, defaults=defaults)
        two = await run_batch_file(changed, model=MODEL, settings=settings, progress=False, defaults=defaults)
        frames = [await results_frame(settings, two.batch.id), await results(two.batch.id, settings=settings)]
    lines = by_id(two.output)
    for frame in frames:
        rows = {row["custom_id"]: row for row in frame.iter_rows(named=True)}
        assert len(rows) == len(prompts)
        for i in range(len(prompts)):
            row, line = rows[f"request-{i}"], lines[f"request-{i}"]
            expected = None if i % 4 == 1 else {"batch_id": one.batch.id, "custom_id": f"request-{i}"}
            assert row["cached_from"] == line["obatch"]["cached_from"] == expected
            for name in PROVENANCE_COLUMNS:
                assert row[name] == line["obatch"][name], (name, i)
        answered = frame.filter(pl.col("cached_from").is_null())
        assert answered["host"].to_list() == [sim.url] * 3 and answered["attempts"].to_list() == [1] * 3
        assert frame.filter(pl.col("cached_from").struct.field("batch_id") == one.batch.id).height == 9


@pytest.mark.usefixtures("db_url")
async def test_sampled_requests_are_reused_only_under_all(tmp_path: Path, make_settings: Callable[..., Settings]
                                                          ) -> None:
    lines = [chat_line(f"s{i}", f"tell me a story {i}", max_tokens=8, temperature=0.8) for i in range(20)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        await run_batch_file(path, settings=settings, progress=False)
        await run_batch_file(path, settings=settings, progress=False, fresh=True)  # auto: sampled, sent again
        assert sent(sim) == 40
        again = await run_batch_file(path, settings=settings, progress=False, fresh=True, cache="all")
        assert sent(sim) == 40
        off = await run_batch_file(path, settings=settings, progress=False, fresh=True, cache="off")
        assert sent(sim) == 60
    assert all(line["obatch"]["cached_from"] is not None for line in read_lines(again.output))
    assert all(line["obatch"]["cached_from"] is None for line in read_lines(off.output))
    with pytest.raises(errors.ConfigError):
        await run_batch_file(path, settings=settings, progress=False, cache="sometimes")  # type: ignore[arg-type]


@pytest.mark.usefixtures("db_url")
async def test_another_model_digest_misses(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [greedy(f"r{i}", f"q{i}") for i in range(12)])
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        await run_batch_file(path, settings=settings, progress=False)
        # the same name pulled again: other weights
        sim.config.models = tuple(dataclasses.replace(m, revision="2") if m.key == MODEL else m
                                  for m in sim.config.models)
        repulled = await run_batch_file(path, settings=settings, progress=False, fresh=True)
        assert sent(sim) == 24
        again = await run_batch_file(path, settings=settings, progress=False, fresh=True)
        assert sent(sim) == 24  # the new weights' answers are reused in turn
    assert all(line["obatch"]["cached_from"] is None for line in read_lines(repulled.output))
    assert {line["obatch"]["cached_from"]["batch_id"] for line in read_lines(again.output)} == {repulled.batch.id}


@pytest.mark.usefixtures("db_url")
async def test_identical_lines_run_once(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    distinct = 80
    lines = [greedy(f"r{i}", f"prompt {i}") for i in range(distinct)]
    lines += [greedy(f"dup{i}", f"prompt {i % 20}", user=f"someone-{i}") for i in range(20)]  # 20% repeat a line
    lines += [chat_line(f"sampled{i}", "same sampled prompt", max_tokens=8) for i in range(3)]  # never merged (auto)
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        report = await run_batch_file(write_jsonl(tmp_path / "in.jsonl", lines), settings=make_settings(sim.url),
                                      progress=False)
        assert sent(sim) == distinct + 3
    out = by_id(report.output, report.errors)
    assert len(out) == len(lines) and report.batch.completed == len(lines)
    for i in range(20):
        copy = out[f"dup{i}"]
        assert copy["obatch"]["cached_from"] == {"batch_id": report.batch.id, "custom_id": f"r{i % 20}"}
        assert content(copy) == content(out[f"r{i % 20}"])
    assert all(out[f"sampled{i}"]["obatch"]["cached_from"] is None for i in range(3))


@pytest.mark.usefixtures("db_url")
async def test_embeddings_are_reused(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "nomic-embed-text", "input": f"text {i % 5}"}} for i in range(10)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2)) as sim:
        settings = make_settings(sim.url)
        one = await run_batch_file(path, settings=settings, progress=False)
        assert sent(sim) == 5
        await run_batch_file(path, settings=settings, progress=False, fresh=True)
        assert sent(sim) == 5
    out = by_id(one.output)
    assert out["e7"]["response"]["body"]["data"] == out["e2"]["response"]["body"]["data"]


@pytest.mark.usefixtures("db_url")
async def test_exactly_once_under_faults_with_repeats(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """Transient faults on the leaders: their copies still end once each, with the leader's answer; a leader that
    fails for good leaves its copies to run themselves (and fail the same way)."""
    lines = [greedy(f"r{i}", f"prompt {i % 50}") for i in range(200)]  # each prompt four times
    lines += [greedy(f"gone{i}", "hello", model="no-such-model") for i in range(3)]
    config = SimConfig(num_parallel=4, error_rate=0.2, reset_rate=0.1, seed=5)
    async with OllamaSim(config) as sim:
        report = await run_batch_file(write_jsonl(tmp_path / "in.jsonl", lines),
                                      settings=make_settings(sim.url, max_attempts=15), concurrency=8, progress=False)
        assert sim.stats.errors_injected + sim.stats.resets_injected > 5
        assert sim.stats.served == 50  # one full answer per distinct prompt
    out = by_id(report.output, report.errors)
    assert sorted(out) == sorted(line["custom_id"] for line in lines)
    for i in range(50, 200):
        assert content(out[f"r{i}"]) == content(out[f"r{i % 50}"])
        assert out[f"r{i}"]["obatch"]["cached_from"]["custom_id"] == f"r{i % 50}"
    assert {out[f"gone{i}"]["error"]["code"] for i in range(3)} == {"model_not_found"}


# ------------------------------------------------------------------------------------------------- server


async def run_as(settings: Settings, owner: str, path: Path, metadata: dict[str, str] | None = None
                 ) -> tuple[BatchRow, list[dict[str, Any]]]:
    """A batch made and driven as the server's worker does, for one API key's owner; its output lines."""
    engine, sessions = await open_store(settings.db_url)
    backend = OllamaBackend(settings.ollama_url)
    try:
        svc = batches.Services(settings, sessions, backend)
        stored = await batches.store_file(svc, batches.read_chunks(path), filename=path.name, purpose="batch",
                                          owner=owner)
        batch = await batches.create_batch(svc, input_file_id=stored.id, endpoint=None, owner=owner,
                                           metadata=metadata)
        done = await batches.process(svc, batch.id)
        output = batches.file_path(settings, done.output_file_id) if done.output_file_id else None
        return done, read_lines(output) if output else []
    finally:
        await backend.aclose()
        await engine.dispose()


async def forget_output(settings: Settings, batch: BatchRow) -> None:
    engine, sessions = await open_store(settings.db_url)
    try:
        assert batch.output_file_id
        await batches.delete_file(batches.Services(settings, sessions, OllamaBackend(settings.ollama_url)),
                                  batch.output_file_id)
    finally:
        await engine.dispose()


@pytest.mark.usefixtures("db_url")
async def test_the_server_cache_is_per_api_key_and_goes_with_the_output_file(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [greedy(f"r{i}", f"q{i}") for i in range(10)])
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        alice, _ = await run_as(settings, "alice", path)
        assert sent(sim) == 10
        _, bobs = await run_as(settings, "bob", path)
        assert sent(sim) == 20  # never another tenant's answers
        assert all(line["obatch"]["cached_from"] is None for line in bobs)
        _, again = await run_as(settings, "alice", path)
        assert sent(sim) == 20
        assert {line["obatch"]["cached_from"]["batch_id"] for line in again} == {alice.id}
        _, off = await run_as(settings, "alice", path, metadata={"obatch_cache": "off"})
        assert sent(sim) == 30
        assert all(line["obatch"]["cached_from"] is None for line in off)
        with pytest.raises(errors.ConfigError):
            await run_as(settings, "alice", path, metadata={"obatch_cache": "maybe"})

    fresh_dir = tmp_path / "second"
    fresh_dir.mkdir()
    path = write_jsonl(fresh_dir / "in.jsonl", [greedy(f"r{i}", f"other {i}") for i in range(10)])
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        first, _ = await run_as(settings, "carol", path)
        await forget_output(settings, first)  # deleted (or expired): its answers leave the cache with it
        _, after = await run_as(settings, "carol", path)
        assert sent(sim) == 20
        assert all(line["obatch"]["cached_from"] is None for line in after)


# ------------------------------------------------------------------------------------------------- kill -9


def test_sigkill_mid_batch_with_repeats_resumes_exactly_once(tmp_path: Path) -> None:
    n, distinct = 160, 80
    lines = [greedy(f"r{i}", f"q{i % distinct}") for i in range(n)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    sim = OllamaSim(SimConfig(num_parallel=4, decode_tps=300))
    url, stop = run_in_thread(sim=sim)
    data = tmp_path / "data"
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    args, env = killable_run(path, url, tmp_path)
    try:
        sigkill_once_done(args, env, data / "obatch.db", 20)
        assert 20 <= succeeded_rows(data / "obatch.db") < n and not out.exists()
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        served = sim.stats.served
    finally:
        stop()
    assert rerun.returncode == 0, rerun.stderr
    assert err.read_bytes() == b""
    got = by_id(out)
    assert sorted(got) == sorted(f"r{i}" for i in range(n))
    for i in range(distinct, n):
        assert content(got[f"r{i}"]) == content(got[f"r{i % distinct}"])
        assert got[f"r{i}"]["obatch"]["cached_from"]["custom_id"] == f"r{i % distinct}"
    assert served <= distinct + 8  # the repeats were never sent; at most what was in flight at the kill, again
    with sqlite3.connect(data / "obatch.db") as conn:  # the batch's count of reused lines survived the kill
        assert conn.execute("SELECT cached FROM batches").fetchall() == [(n - distinct,)]
    assert f"{n} succeeded, 0 failed of {n}" in rerun.stdout


async def test_the_embedded_engine_names_its_model_by_the_file(tmp_path: Path) -> None:
    import hashlib

    from obatch.backends.local import LocalBackend
    from obatch.backends.pool import Pool
    from obatch.batches.provenance import ask
    from obatch.batches.reuse import identity
    from obatch.testing.tiny_gguf import write_tiny_model

    path = write_tiny_model(tmp_path / "tiny.gguf")
    backend = LocalBackend(path, alias="tiny")
    try:
        named = identity(await ask(Pool.of(backend, concurrency=1), "tiny"), "tiny")
    finally:
        await backend.aclose()
    assert named == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_batch_object_counts_reused_lines_while_it_runs_and_once_final(obatch_server: ServerProcess) -> None:
    """``obatch.cached``: the lines answered from stored answers show at once, while new lines still run; once final
    the count adds the copies of an identical line; a batch that reused nothing counts 0."""
    tag = f"counted {time.time_ns()}"  # prompts no other test of the shared server has asked

    def line(custom_id: str, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{tag}: {prompt}"}],
                         "max_tokens": max_tokens, "temperature": 0}}

    known = [line(f"k{i}", f"known {i}") for i in range(10)]
    slow = [line(f"s{i}", f"new {i}", max_tokens=240) for i in range(8)]  # ~1.2 s each on the shared simulator
    copies = [line(f"c{i}", "new 0", max_tokens=240) for i in range(3)]  # the same as s0: answered by its answer
    with Client(obatch_server.url, api_key=KEYS["alice"]) as alice:
        def submit(lines: list[dict[str, Any]]) -> str:
            body = b"".join(orjson.dumps(x) + b"\n" for x in lines)
            stored = alice.upload_file(io.BytesIO(body), "in.jsonl")
            return alice.create_batch(stored.id, endpoint="/v1/chat/completions", concurrency=4).id

        def final(batch_id: str) -> Batch:
            deadline = time.monotonic() + 60
            while (batch := alice.get_batch(batch_id)).status not in FINAL:
                assert time.monotonic() < deadline, batch.status
                time.sleep(0.05)
            return batch

        first = final(submit(known))
        assert first.status == "completed" and first.obatch is not None and first.obatch.cached == 0
        second = submit(known + slow + copies)
        seen_running = None
        deadline = time.monotonic() + 60
        while (batch := alice.get_batch(second)).status not in FINAL:
            assert time.monotonic() < deadline, batch.status
            counts = batch.request_counts
            if batch.obatch and batch.obatch.cached and counts and counts.completed < counts.total:
                seen_running = batch.obatch.cached
            time.sleep(0.05)
        assert seen_running == len(known)  # the stored answers, counted while the new lines ran
        assert batch.status == "completed" and batch.obatch is not None
        assert batch.obatch.cached == len(known) + len(copies)
        output = [orjson.loads(x) for x in alice.file_content(batch.output_file_id or "").splitlines()]
        assert sum(x["obatch"]["cached_from"] is not None for x in output) == batch.obatch.cached
        assert alice.list_batches(limit=5).data[0].obatch.cached == batch.obatch.cached  # the list says the same
