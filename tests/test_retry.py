"""Retry only what failed: a new batch of exactly the lines a retry can change, linked both ways, and the chain's
results read as one (each custom_id at its latest outcome). Through the notebook API, the CLI and the server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from obatch import batches, errors
from obatch.api import results, retry, retry_batch, run_batch_file
from obatch.batches import reading
from obatch.batches.retry import create_retry
from obatch.cli import main
from obatch.client import ApiError, Client
from obatch.config import Settings
from obatch.store import chains, repo
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.server import ServerProcess
from tests.helpers import chat_line, write_jsonl
from tests.serverkit import FINAL, KEYS, parse_jsonl
from tests.serverkit import chat_line as server_line
from tests.test_batches import _start as start_batch

GHOST = "no-such-model"


def input_ids(settings: Settings, file_id: str) -> list[str]:
    """The custom_ids of a stored input file, in its order."""
    path = batches.file_path(settings, file_id)
    return [orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines()]


def ids_where(frame: pl.DataFrame, **equal: Any) -> set[str]:
    for name, value in equal.items():
        frame = frame.filter(pl.col(name) == value)
    return set(frame["custom_id"])


@pytest.mark.usefixtures("db_url")
async def test_a_retry_runs_exactly_the_retryable_failures_and_the_chain_reads_as_one(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=4) for i in range(80)]
    lines += [chat_line(f"bad{i}", model=GHOST) for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4, error_rate=0.3, seed=7)) as sim:
        settings = make_settings(sim.url, max_attempts=1)  # an engine error fails its line at once
        first = await run_batch_file(path, settings=settings, concurrency=4, progress=False)
        frame = await results(first.batch.id, settings=settings)
        transient = ids_where(frame, error_code="server_error")
        refused = ids_where(frame, error_code="model_not_found")
        assert transient and len(transient) < 80 and refused == {"bad0", "bad1", "bad2"}
        sim.config.error_rate = 0.0
        served = sim.stats.served

        second = await retry_batch(first.batch.id, settings=settings, concurrency=4, progress=False)

        assert sim.stats.served - served == len(transient)  # the engine saw the retried lines only
        order = [line["custom_id"] for line in lines]
        assert input_ids(settings, second.batch.input_file_id) == [c for c in order if c in transient]
        assert second.batch.status == "completed" and second.batch.completed == len(transient)
        engine, sessions = await open_store(settings.db_url)
        async with sessions() as session:
            assert (await repo.get_batch(session, second.batch.id)).parent_id == first.batch.id
            assert await chains.retry_ids(session, [first.batch.id]) == {first.batch.id: [second.batch.id]}
            wire = batches.batch_object(await repo.get_batch(session, first.batch.id),
                                        retries=[second.batch.id])
        assert wire.obatch is not None and wire.obatch.retries == [second.batch.id]
        assert batches.batch_object(second.batch).obatch.parent == first.batch.id  # type: ignore[union-attr]

        for merged in (await results(first.batch.id, merged=True, settings=settings),
                       await results(second.batch.id, merged=True, settings=settings)):  # any batch of the chain
            assert merged["custom_id"].to_list() == order  # every line once, in input order
            assert ids_where(merged, batch_id=second.batch.id) == transient
            assert ids_where(merged, status="succeeded") == set(order) - refused
            assert ids_where(merged, batch_id=first.batch.id, error_code="model_not_found") == refused

        # Lines the engine refused stay as they are unless their code is asked for.
        with pytest.raises(errors.ConflictError, match="nothing to retry"):
            await retry_batch(first.batch.id, settings=settings, progress=False)
        frame = await retry(first.batch.id, codes=["model_not_found"], settings=settings, progress=False)
        third = set(frame["batch_id"]) - {first.batch.id, second.batch.id}
        assert len(third) == 1 and ids_where(frame, batch_id=third.pop(), error_code="model_not_found") == refused
        assert frame["custom_id"].to_list() == order and ids_where(frame, batch_id=second.batch.id) == transient
        async with sessions() as session:
            retries = await chains.retry_ids(session, [first.batch.id])
            assert len(retries[first.batch.id]) == 2 and retries[first.batch.id][0] == second.batch.id
            family = await chains.chain(session, retries[first.batch.id][1])
            assert [b.id for b in family][:2] == [first.batch.id, second.batch.id] and len(family) == 3
        await engine.dispose()


async def test_a_cancelled_batchs_unrun_lines_are_retried(tmp_path: Path, make_settings: Callable[..., Settings]
                                                           ) -> None:
    # Model groups run in name order: the unknown model's line fails before the cancel.
    lines = [chat_line(f"r{i}", max_tokens=20) for i in range(40)] + [chat_line("ghost", model="a-ghost")]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as sim:
        settings = make_settings(sim.url, concurrency=2)
        svc, first_id, engine = await start_batch(sim, settings, path)
        first = await batches.reload(svc, first_id)
        task = asyncio.create_task(batches.process(svc, first.id))
        while (await batches.reload(svc, first.id)).completed < 4:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.02)
        with pytest.raises(errors.ConflictError, match="is in_progress"):
            await create_retry(svc, first.id)  # not while a batch of the chain runs
        await batches.request_cancel(svc, first.id)
        done = await asyncio.wait_for(task, 10)
        assert done.status == "cancelled"
        frame = await results(first.id, settings=settings)
        unrun = ids_where(frame, status="pending")
        assert unrun and len(unrun) < 40 and ids_where(frame, error_code="model_not_found") == {"ghost"}

        again = await create_retry(svc, first.id)
        assert set(input_ids(settings, again.input_file_id)) == unrun and again.parent_id == first.id
        assert (again.source, again.completion_window) == (first.source, first.completion_window)
        finished = await batches.process(svc, again.id)
        assert finished.status == "completed" and finished.completed == len(unrun)
        merged = await results(first.id, merged=True, settings=settings)
        assert sorted(merged["custom_id"]) == sorted(line["custom_id"] for line in lines)
        assert ids_where(merged, status="succeeded") == {f"r{i}" for i in range(40)}
        with pytest.raises(errors.NotFoundError):
            await create_retry(svc, "batch-000000000000000000000000")
        with pytest.raises(errors.ConfigError):
            await create_retry(svc, first.id, codes=[""])
        await svc.backend.aclose()
        await engine.dispose()


async def test_following_a_chain_while_its_retry_runs_gives_each_line_at_its_final_outcome(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """A cursor reader of the merged chain (``obatch results --merged --follow``, ``/results?merged=true&after=``)
    gets each line once: a line the running retry will run is held back until it has, not given at the failure the
    retry replaces."""
    lines = [chat_line(f"r{i}", max_tokens=4) for i in range(30)] + [chat_line("ghost", model=GHOST)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, error_rate=0.4, decode_tps=400, seed=3)) as sim:
        settings = make_settings(sim.url, concurrency=2, max_attempts=1)
        svc, first_id, engine = await start_batch(sim, settings, path)
        first = await batches.process(svc, first_id)
        failed = ids_where(await results(first.id, settings=settings), error_code="server_error")
        assert failed and first.status == "completed"
        sim.config.error_rate = 0.0
        again = await create_retry(svc, first.id)  # still to be imported: every line not succeeded waits
        page = await reading.read_page(svc.sessions, first.id, data_dir=settings.data_dir, merged=True)
        order = [line["custom_id"] for line in lines]
        assert [orjson.loads(x)["custom_id"] for x in page.lines] == order[:min(order.index(c) for c in failed)]
        assert not page.finished

        async def follow() -> list[dict[str, Any]]:
            return [orjson.loads(x) async for x in reading.follow(svc.sessions, first.id, data_dir=settings.data_dir,
                                                                   merged=True, interval=0.02)]
        reader = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        assert not reader.done()  # the chain is not final: the reader waits for the retry
        done = await batches.process(svc, again.id)
        read = await asyncio.wait_for(reader, 30)
        assert done.status == "completed" and done.completed == len(failed)
        assert [x["custom_id"] for x in read] == order  # each line once, in input order
        by_id = {x["custom_id"]: x for x in read}
        assert all(by_id[c]["error"] is None and by_id[c]["response"]["status_code"] == 200 for c in failed)
        assert by_id["ghost"]["error"]["code"] == "model_not_found"  # not retried: given at its own outcome
        await svc.backend.aclose()
        await engine.dispose()


def test_the_command_line_retries_and_prints_the_chain(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBATCH_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("OBATCH_RETRY_INITIAL_WAIT", "0.01")
    lines = [chat_line(f"r{i}", max_tokens=3) for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    sim = OllamaSim(SimConfig(num_parallel=4, error_rate=0.4, seed=11))
    url, stop = run_in_thread(sim=sim)
    common = ["--backend", "ollama", "--url", url, "--data-dir", str(tmp_path / "d")]
    try:
        assert main(["run", str(path), "-q", *common]) == 0
        first = capsysbinary.readouterr().out.decode().split(":")[0]
        sim.config.error_rate = 0.0
        assert main(["retry", first, "-q", *common]) == 0
        said = capsysbinary.readouterr().out.decode()
    finally:
        stop()
    assert said.startswith(f"retry of {first}: batch-") and "failed of" in said
    second = said.split(": ")[1]
    assert main(["results", first, "--data-dir", str(tmp_path / "d")]) == 0
    alone = parse_jsonl(capsysbinary.readouterr().out.decode())
    assert main(["results", first, "--merged", "--data-dir", str(tmp_path / "d")]) == 0
    merged = parse_jsonl(capsysbinary.readouterr().out.decode())
    assert [line["custom_id"] for line in merged] == [line["custom_id"] for line in alone] == [f"r{i}" for i in
                                                                                                 range(40)]
    failed = {line["custom_id"] for line in alone if line["error"]}
    assert failed and all(line["response"]["status_code"] == 200 for line in merged)
    output = (tmp_path / "d" / "results" / second / "output.jsonl").read_bytes().splitlines(keepends=True)
    assert [orjson.loads(line)["custom_id"] for line in output] == sorted(failed, key=lambda c: int(c[1:]))
    redone = [line for line in merged if line["custom_id"] in failed]
    assert [orjson.dumps(line) + b"\n" for line in redone] == [orjson.dumps(orjson.loads(x)) + b"\n"
                                                                for x in output]
    assert main(["retry", first, "-q", *common]) == 1  # nothing left to retry
    assert "nothing to retry" in capsysbinary.readouterr().err.decode()


def test_a_retry_killed_midway_resumes_exactly_once(tmp_path: Path) -> None:
    n = 120
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", f"q{i}", max_tokens=40) for i in range(n)])
    sim = OllamaSim(SimConfig(num_parallel=4, decode_tps=300, default_output_tokens=2000, error_rate=0.5, seed=3))
    url, stop = run_in_thread(sim=sim)
    data = tmp_path / "data"
    common = ["--backend", "ollama", "--url", url, "--data-dir", str(data), "-q"]
    env = {**os.environ, "OBATCH_MAX_ATTEMPTS": "1", "OBATCH_COMMIT_INTERVAL": "0.05", "OBATCH_COMMIT_EVERY": "4",
           "OBATCH_LEASE_TTL": "2", "OBATCH_LEASE_HEARTBEAT": "0.5"}
    command = [sys.executable, "-m", "obatch.cli"]
    try:
        first = subprocess.run([*command, "run", str(path), *common], env=env, capture_output=True, text=True,
                               timeout=120, check=True).stdout.split(":")[0]
        sim.config.error_rate = 0.0
        victim = subprocess.Popen([*command, "retry", first, *common], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while retried(data / "obatch.db") < 8:
            assert victim.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        rerun = subprocess.run([*command, "retry", first, *common], env=env, capture_output=True, text=True,
                               timeout=120)
    finally:
        stop()
    assert rerun.returncode == 0, rerun.stderr
    second = rerun.stdout.split(": ")[1]
    with sqlite3.connect(data / "obatch.db") as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 2  # resumed, not made again
        failed = {row[0] for row in conn.execute("SELECT custom_id FROM requests WHERE batch_id=? AND state='failed'",
                                                 (first,))}
    output = [orjson.loads(line)["custom_id"] for line in
              (data / "results" / second / "output.jsonl").read_bytes().splitlines()]
    assert failed and sorted(output) == sorted(failed) and len(set(output)) == len(output)  # each line once
    assert f"{len(failed)} succeeded, 0 failed of {len(failed)}" in rerun.stdout


def retried(db: Path) -> int:
    """Lines a retry (a batch with a parent) has finished."""
    with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(db, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM requests JOIN batches ON batches.id = requests.batch_id "
                                "WHERE batches.parent_id IS NOT NULL AND state='succeeded'").fetchone()[0])
    return 0


# ------------------------------------------------------------------------------------------------ server


def wait_final(client: Client, batch_id: str, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while (batch := client.get_batch(batch_id)).status not in FINAL:
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.1)
    return batch


def test_the_server_retries_for_the_owner_only(obatch_server: ServerProcess) -> None:
    lines = [server_line(f"s{i}", max_tokens=120) for i in range(24)] + [server_line("ghost", model=GHOST)]
    with Client(obatch_server.url, api_key=KEYS["alice"]) as alice, \
            Client(obatch_server.url, api_key=KEYS["bob"]) as bob:
        uploaded = alice.upload_file(io.BytesIO(b"".join(orjson.dumps(x) + b"\n" for x in lines)), "in.jsonl")
        first = alice.create_batch(uploaded.id, endpoint="/v1/chat/completions", concurrency=2)
        while alice.get_batch(first.id).request_counts.completed < 2:  # type: ignore[union-attr]
            time.sleep(0.05)
        with pytest.raises(ApiError) as running:
            alice.retry_batch(first.id)
        assert running.value.status == 409 and running.value.code == "conflict"
        alice.cancel_batch(first.id)
        cancelled = wait_final(alice, first.id)
        assert cancelled.status == "cancelled"

        for call in (lambda: bob.retry_batch(first.id), lambda: bob.batch_results(first.id)):
            with pytest.raises(ApiError) as hidden:
                call()
            assert hidden.value.status == 404 and hidden.value.code == "not_found"
        with pytest.raises(ApiError) as unknown:
            alice.retry_batch("batch-000000000000000000000000")
        assert unknown.value.status == 404
        for bad in ([], ["x" * 65]):
            with pytest.raises(ApiError) as refused:
                alice.retry_batch(first.id, codes=bad)
            assert refused.value.status == 400 and refused.value.type == "invalid_request_error"

        again = alice.retry_batch(first.id)
        assert again.obatch is not None and again.obatch.parent == first.id
        parent = alice.get_batch(first.id)
        assert parent.obatch is not None and parent.obatch.retries == [again.id]
        assert any(b.id == again.id and b.obatch and b.obatch.parent == first.id for b in alice.list_batches())
        done = wait_final(alice, again.id)
        unrun = cancelled.obatch.not_run if cancelled.obatch else 0
        assert done.status == "completed" and done.request_counts.total == unrun  # type: ignore[union-attr]

        merged = alice.batch_results(first.id, merged=True, limit=1000)
        assert merged.finished and [x["custom_id"] for x in merged] == [x["custom_id"] for x in lines]
        by_id = {x["custom_id"]: x for x in merged}
        assert by_id["ghost"]["error"]["code"] == "model_not_found"
        assert all(by_id[f"s{i}"]["response"]["status_code"] == 200 for i in range(24))
        content = alice.file_content(done.output_file_id or "")
        assert {x["custom_id"]: x for x in parse_jsonl(content.decode())} == {
            k: v for k, v in by_id.items() if k in {x["custom_id"] for x in parse_jsonl(content.decode())}}
        with pytest.raises(ApiError) as nothing:
            alice.retry_batch(first.id)
        assert nothing.value.status == 409
