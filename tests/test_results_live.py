"""Results while a batch runs: pages in input order with a cursor while lines finish out of order (no line twice,
none skipped), each line the bytes its output or error file later holds; owner only; cheap indexed reads."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from obatch import batches
from obatch.api import results
from obatch.batches import reading
from obatch.client import Client
from obatch.config import Settings
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from obatch.testing.server import ServerProcess
from tests.helpers import chat_line, write_jsonl
from tests.serverkit import KEYS, assert_openai_error
from tests.serverkit import chat_line as server_line
from tests.test_batches import _start as start_batch


def by_line(*paths: Path) -> list[bytes]:
    """The lines of a batch's output and error files together, in input order."""
    lines = [line for path in paths if path.exists() for line in path.read_bytes().splitlines(keepends=True)]
    return sorted(lines, key=lambda line: orjson.loads(line)["obatch"]["line"])


@pytest.mark.usefixtures("db_url")
async def test_pages_follow_lines_finishing_out_of_order(tmp_path: Path, make_settings: Callable[..., Settings]
                                                         ) -> None:
    # Every fifth line is slow, so later lines finish before it; some fail at the engine, one model is unknown.
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=80 if i % 5 == 0 else 3) for i in range(60)]
    lines.insert(30, chat_line("ghost", model="no-such-model"))
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    config = SimConfig(num_parallel=4, decode_tps=400, default_output_tokens=2000, error_rate=0.1, seed=2)
    async with OllamaSim(config) as sim:
        settings = make_settings(sim.url, max_attempts=1, concurrency=4)
        svc, batch_id, engine = await start_batch(sim, settings, path)
        sessions = svc.sessions
        task = asyncio.create_task(batches.process(svc, batch_id))
        read: list[bytes] = []
        after, gaps, pages = 0, 0, 0
        while True:
            page = await reading.read_page(sessions, batch_id, data_dir=settings.data_dir, after=after, limit=4)
            pages += 1
            assert page.after >= after and len(page.lines) <= 4
            read += page.lines
            if page.finished:
                break
            if len(page.lines) < 4:  # caught up: are later lines finished already (out of order)?
                finished = len(await results(batch_id, settings=settings))
                gaps += finished > len(read)
                await asyncio.sleep(0.01)
            after = page.after
        done = await task
        assert task.done() and done.status == "completed"
        end = await reading.read_page(sessions, batch_id, data_dir=settings.data_dir, after=page.after, limit=4)
        assert end.lines == [] and end.finished and end.after == page.after == len(lines)
        await svc.backend.aclose()
        await engine.dispose()
    assert gaps > 0 and pages > 10  # lines did finish out of order while the pages were read
    ids = [orjson.loads(line)["custom_id"] for line in read]
    assert ids == [line["custom_id"] for line in lines]  # each line once, in input order, none skipped
    files = [batches.file_path(settings, done.output_file_id or ""), batches.file_path(settings, done.error_file_id
                                                                                       or "")]
    assert read == by_line(*files)  # the very bytes of the output and error files
    failed = [orjson.loads(line) for line in read if orjson.loads(line)["error"]]
    assert {x["error"]["code"] for x in failed} == {"server_error", "model_not_found"}


async def test_a_snapshot_frame_and_follow_while_running(tmp_path: Path, make_settings: Callable[..., Settings]
                                                         ) -> None:
    lines = [chat_line(f"r{i}", max_tokens=200 if i == 0 else 3) for i in range(20)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4, decode_tps=100, default_output_tokens=2000)) as sim:
        settings = make_settings(sim.url, concurrency=4)
        svc, batch_id, engine = await start_batch(sim, settings, path)
        sessions = svc.sessions
        task = asyncio.create_task(batches.process(svc, batch_id))
        while len(frame := await results(batch_id, settings=settings)) < 19:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.02)
        assert "r0" not in frame["custom_id"].to_list()  # the slow first line is still running: not in the frame
        page = await reading.read_page(sessions, batch_id, data_dir=settings.data_dir, limit=100)
        assert page.lines == []  # ...and it holds the cursor
        followed = [line async for line in reading.follow(sessions, batch_id, data_dir=settings.data_dir,
                                                          interval=0.02)]
        done = await task
        await svc.backend.aclose()
        await engine.dispose()
    assert [orjson.loads(x)["custom_id"] for x in followed] == [f"r{i}" for i in range(20)]
    assert followed == by_line(batches.file_path(settings, done.output_file_id or ""))
    assert (await results(batch_id, settings=settings))["custom_id"].to_list() == [f"r{i}" for i in range(20)]


async def test_the_read_is_a_range_of_the_primary_key(tmp_path: Path) -> None:
    """The page query and the chain's lookups search an index (the migrated schema's); none scans a table."""
    db = tmp_path / "obatch.db"
    engine, _ = await open_store(f"sqlite+aiosqlite:///{db}")
    await engine.dispose()
    with sqlite3.connect(db) as conn:
        page = conn.execute("EXPLAIN QUERY PLAN SELECT custom_id, state, line FROM requests WHERE batch_id=? "
                            "AND line>? ORDER BY line LIMIT 100", ("b", 0)).fetchall()
        lookup = conn.execute("EXPLAIN QUERY PLAN SELECT batch_id, state, line FROM requests WHERE batch_id IN "
                              "(?, ?) AND custom_id IN (?, ?) AND state != 'pending'", ("a", "b", "x", "y")).fetchall()
        children = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM batches WHERE parent_id IN (?)", ("a",)).fetchall()
    for plan in (page, lookup, children):
        text = " ".join(str(step[-1]) for step in plan)
        assert "SEARCH" in text and "SCAN" not in text, text


# ------------------------------------------------------------------------------------------------ server


def test_the_server_pages_results_for_the_owner_only(obatch_server: ServerProcess) -> None:
    lines = [server_line(f"s{i}", max_tokens=100 if i % 4 == 0 else 4) for i in range(24)]
    body = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    with Client(obatch_server.url, api_key=KEYS["carol"]) as carol, \
            httpx.Client(base_url=obatch_server.url, timeout=30) as http:
        batch_id = carol.create_batch(carol.upload_file(io.BytesIO(body), "in.jsonl").id,
                                      endpoint="/v1/chat/completions", concurrency=4).id
        raw, after, pages = b"", 0, 0
        deadline = time.monotonic() + 60
        while True:
            page = carol.batch_results(batch_id, after=after, limit=5)
            pages += 1
            raw += page.raw
            assert len(page) <= 5 and page.after >= after
            if page.finished:
                break
            assert time.monotonic() < deadline
            after = page.after
            if len(page) < 5:
                time.sleep(0.05)
        done = carol.get_batch(batch_id)
        assert done.status == "completed" and pages > 5
        assert raw == carol.file_content(done.output_file_id or "")  # the output file, byte for byte
        assert [x["custom_id"] for x in carol.follow_results(batch_id, poll=0.05)] == [x["custom_id"] for x in lines]

        auth = {"Authorization": f"Bearer {KEYS['carol']}"}
        answer = http.get(f"/v1/batches/{batch_id}/results", params={"after": 20, "limit": 2}, headers=auth)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/jsonl")
        assert answer.headers["x-obatch-next-after"] == "22" and answer.headers["x-obatch-finished"] == "false"
        assert [orjson.loads(x)["custom_id"] for x in answer.content.splitlines()] == ["s20", "s21"]
        last = http.get(f"/v1/batches/{batch_id}/results", params={"after": 22}, headers=auth)
        assert last.headers["x-obatch-finished"] == "true" and last.headers["x-obatch-next-after"] == "24"
        for params in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"limit": "x"}):
            assert_openai_error(http.get(f"/v1/batches/{batch_id}/results", params=params, headers=auth), 400)
        other = {"Authorization": f"Bearer {KEYS['dave']}"}
        error: dict[str, Any] = assert_openai_error(http.get(f"/v1/batches/{batch_id}/results", headers=other), 404)
        assert error["code"] == "not_found"
        assert_openai_error(http.get("/v1/batches/batch-000000000000000000000000/results", headers=auth), 404)
