"""Provenance: every output line says which host answered it, with the engine, its version and the model's digest
there, the context asked and loaded, the seed and the attempts; the batch object carries obatch's version and the
engine hosts (a line names its host; the long strings are kept once per batch, not per line)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from litestar.testing import AsyncTestClient

import obatch
from obatch.api import results_frame, run_batch_file
from obatch.backends.local import LocalBackend
from obatch.backends.openai import reported_identity
from obatch.batches import batch_object, provenance
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from tests.helpers import chat_line, jsonl, write_jsonl
from tests.serverkit import settled

CHAT = "llama3.2:1b"
ENTRY_KEYS = ("host", "engine", "engine_version", "model_digest")


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def sim_digest(name: str) -> str:
    return SimModel(name).digest


async def test_cli_lines_and_batch_carry_their_provenance(tmp_path: Path,
                                                          make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=4, **({"seed": 1000 + i} if i % 2 else {}))
             for i in range(20)]
    lines.append(chat_line("opt", "with options", max_tokens=4, options={"seed": 7}))
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, version="0.13.1", error_rate=0.2, seed=2)) as a, \
            OllamaSim(SimConfig(num_parallel=2, version="0.12.9", seed=3)) as b:
        settings = make_settings(f"{a.url},{b.url}", max_attempts=10)
        report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
        served = {a.url: a.stats.served, b.url: b.stats.served}
    output = read(report.output)
    assert len(output) == 21 and not read(report.errors)
    versions = {a.url: "0.13.1", b.url: "0.12.9"}
    for line in output:
        stats = line["obatch"]
        assert stats["engine"] == "ollama" and stats["engine_version"] == versions[stats["host"]]
        assert stats["model_digest"] == sim_digest(CHAT)
        assert stats["num_ctx"] and stats["loaded_context"] == stats["num_ctx"]
        assert stats["attempts"] >= 1
    seeds = {line["custom_id"]: line["obatch"]["seed"] for line in output}
    assert seeds == {**{f"r{i}": 1000 + i if i % 2 else None for i in range(20)}, "opt": 7}
    by_host = {url: sum(1 for line in output if line["obatch"]["host"] == url) for url in served}
    assert by_host == served  # each line names the host that really answered it
    assert max(line["obatch"]["attempts"] for line in output) > 1  # faults were retried, and counted

    batch = batch_object(report.batch)
    assert batch.obatch is not None and batch.obatch.version == obatch.__version__
    engines = [e.model_dump() for e in batch.obatch.engines or []]
    assert sorted(engines, key=lambda e: e["host"]) == sorted(
        ({"host": url, "engine": "ollama", "version": versions[url], "models": {CHAT: sim_digest(CHAT)}}
         for url in served), key=lambda e: e["host"])

    frame = await results_frame(settings, report.batch.id)
    assert set(ENTRY_KEYS) | {"seed", "loaded_context", "refused_answers"} <= set(frame.columns)
    rows = {row["custom_id"]: row for row in frame.iter_rows(named=True)}
    for line in output:
        row = rows[line["custom_id"]]
        assert [row[k] for k in (*ENTRY_KEYS, "seed", "loaded_context", "attempts")] == [
            line["obatch"][k] for k in (*ENTRY_KEYS, "seed", "loaded_context", "attempts")]


async def test_each_host_is_asked_for_the_digest_once_per_model_group(tmp_path: Path,
                                                                      make_settings: Callable[..., Settings]) -> None:
    """The cache's identity of a model and the batch's list of hosts are made of one answer per host and model
    group: Ollama's ``/api/tags`` (where its digest is) is asked once for both, not once for each."""
    embed = "nomic-embed-text"
    lines = [chat_line(f"r{i}", f"question {i}", temperature=0, max_tokens=4) for i in range(6)]
    lines.append({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": embed, "input": "x"}})
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2)) as a, OllamaSim(SimConfig(num_parallel=2)) as b:
        settings = make_settings(f"{a.url},{b.url}")
        first = await run_batch_file(path, settings=settings, progress=False)
        asked = [sim.stats.requests["/api/tags"] for sim in (a, b)]
        again = await run_batch_file(path, settings=settings, progress=False, fresh=True)  # every line reused
        asked_again = [sim.stats.requests["/api/tags"] - n for sim, n in zip((a, b), asked, strict=True)]
        answered = sum(sim.stats.answered[path] for sim in (a, b) for path in ("/api/chat", "/api/embed"))
    assert asked == asked_again == [2, 2]  # two model groups, each host asked once for each
    assert answered == len(lines)  # the second run's lines all came from the first's answers
    digests = {CHAT: sim_digest(CHAT), embed: sim_digest(embed)}
    assert all(line["obatch"]["model_digest"] == digests[line["response"]["body"]["model"]]
               for line in read(first.output))
    assert all(line["obatch"]["cached_from"] is not None for line in read(again.output))
    engines = batch_object(first.batch).obatch.engines  # type: ignore[union-attr]
    assert sorted((e.host, e.models) for e in engines or []) == sorted([(a.url, digests), (b.url, digests)])


async def test_a_line_that_never_reached_an_engine_names_no_host(tmp_path: Path,
                                                                 make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line("ok", max_tokens=4), chat_line("gone", model="no-such-model", seed=5)]
    async with OllamaSim(SimConfig()) as sim:
        report = await run_batch_file(write_jsonl(tmp_path / "in.jsonl", lines), settings=make_settings(sim.url),
                                      progress=False)
    [ok], [gone] = read(report.output), read(report.errors)
    assert ok["obatch"]["host"] == sim.url and ok["obatch"]["model_digest"] == sim_digest(CHAT)
    assert gone["error"]["code"] == "model_not_found"
    assert gone["obatch"]["host"] is None and gone["obatch"]["model_digest"] is None
    assert gone["obatch"]["seed"] == 5


async def test_the_server_writes_provenance_on_its_lines_and_batch(make_settings: Callable[..., Settings]) -> None:
    async with OllamaSim(SimConfig(num_parallel=2, version="0.14.0")) as sim:
        app = create_app(make_settings(sim.url, worker_poll_interval=0.05))
        async with AsyncTestClient(app) as client:
            stored = await client.post("/v1/files", data={"purpose": "batch"}, files={"file": (
                "in.jsonl", jsonl([chat_line(f"s{i}", f"q {i}", max_tokens=4, seed=i) for i in range(5)]))})
            created = await client.post("/v1/batches", json={
                "input_file_id": stored.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
            batch = await settled(client, created.json()["id"])
            content = (await client.get(f"/v1/files/{batch['output_file_id']}/content")).content
    assert batch["obatch"]["version"] == obatch.__version__
    assert batch["obatch"]["engines"] == [{"host": sim.url, "engine": "ollama", "version": "0.14.0",
                                           "models": {CHAT: sim_digest(CHAT)}}]
    assert batch["obatch"]["invalid_output"] == 0 and batch["obatch"]["refused_answers"] == 0
    lines = [orjson.loads(line) for line in content.splitlines()]
    assert [line["obatch"]["seed"] for line in lines] == list(range(5))
    assert all(line["obatch"]["host"] == sim.url and line["obatch"]["engine_version"] == "0.14.0"
               and line["obatch"]["model_digest"] == sim_digest(CHAT) for line in lines)


# ---------------------------------------------------------------------------------------------- the pieces


def test_a_resumed_batch_keeps_the_numbers_its_lines_hold() -> None:
    entries: list[dict[str, Any]] = []
    first = provenance.merge(entries, {"host": "h1", "engine": "ollama", "version": "1", "models": {"m": "d1"}})
    again = provenance.merge(entries, {"host": "h1", "engine": "ollama", "version": "1", "models": {"n": "d2"}})
    upgraded = provenance.merge(entries, {"host": "h1", "engine": "ollama", "version": "2", "models": {"m": "d3"}})
    assert (first, again, upgraded) == (0, 0, 1)
    assert entries[0]["models"] == {"m": "d1", "n": "d2"}
    facts = provenance.LineFacts(entries)
    assert facts(0, "n") == ("h1", "ollama", "1", "d2") and facts(1, "m") == ("h1", "ollama", "2", "d3")
    assert facts(None, "m") == (None, None, None, None) and facts(7, "m") == (None, None, None, None)


def test_an_openai_compatible_engine_is_known_by_what_it_reports() -> None:
    meta = {"n_params": 134515008, "size": 100000, "n_vocab": 49152}
    assert reported_identity({"id": "m", "digest": "sha256:abc"}) == "sha256:abc"
    llamacpp = reported_identity({"id": "m", "meta": meta})
    assert llamacpp is not None and llamacpp.startswith("meta:")
    assert llamacpp != reported_identity({"id": "m", "meta": {**meta, "n_params": 1}})
    assert reported_identity({"id": "m", "root": "/models/qwen"}) == "/models/qwen"
    assert reported_identity({"id": "m", "owned_by": "vllm"}) is None


async def test_the_embedded_engine_is_known_by_its_gguf_files_hash(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 9000)
    backend = LocalBackend(gguf, alias="tiny")
    digest = await provenance.model_digest(backend, "tiny")
    assert digest == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    gguf.write_bytes(b"changed")  # read once per backend: the file is not hashed again for each group
    assert await provenance.model_digest(backend, "tiny") == digest
