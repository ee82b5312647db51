"""Compaction: a finished batch's rows keep an index into its output and error files instead of the text they hold,
and every reader gives what it gave before; a crash between the files and the compaction loses and doubles nothing;
a compacted line goes with its file."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import polars as pl
import pytest

from obatch import errors
from obatch.api import RunReport, _services, results, results_frame, run_batch_file
from obatch.batches import compact, reading
from obatch.batches.retry import create_retry
from obatch.batches.services import Services
from obatch.config import Settings
from obatch.store import compaction
from obatch.store.db import open_store
from obatch.store.tables import BatchRow
from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from tests.helpers import chat_line, killable_run, write_jsonl

GHOST = "no-such-model"


def _lines(n: int) -> list[dict[str, Any]]:
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=6, temperature=0) for i in range(n)]
    lines += [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
               "body": {"model": "nomic-embed-text", "input": f"text {i}"}} for i in range(n // 2)]
    return [*lines, chat_line("ghost", model=GHOST)]


async def _readers(settings: Settings, batch_id: str) -> dict[str, Any]:
    """What every reader of a batch's results gives: the pages of /results (alone and merged) and both frames."""
    engine, sessions = await open_store(settings.db_url)
    try:
        pages = [line async for line in reading.follow(sessions, batch_id, data_dir=settings.data_dir, limit=7)]
        merged = [line async for line in reading.follow(sessions, batch_id, data_dir=settings.data_dir, merged=True,
                                                        limit=7)]
    finally:
        await engine.dispose()
    return {"pages": pages, "merged": merged, "frame": await results_frame(settings, batch_id),
            "results": await results(batch_id, merged=True, settings=settings)}


def _rows(settings: Settings) -> list[tuple[Any, ...]]:
    return _rows_of(settings.data_dir / "obatch.db")


def _rows_of(store: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT line, state, body, response, content, error_message, out_offset FROM requests "
                          "ORDER BY batch_id, line").fetchall()


def _equal(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["pages"] == before["pages"] and after["merged"] == before["merged"]
    for name in ("frame", "results"):
        assert cast(pl.DataFrame, after[name]).equals(before[name]), name


async def run_whole(monkeypatch: pytest.MonkeyPatch, path: Path, settings: Settings) -> RunReport:
    """A run of ``path`` whose rows stay whole, as before compaction."""
    with monkeypatch.context() as patch:
        patch.setattr(compact, "owned", lambda *_: False)
        return await run_batch_file(path, settings=settings, concurrency=4, progress=False)


async def compact_twice(settings: Settings, report: RunReport) -> None:
    """Compact a run's rows against its files, then again (which changes nothing)."""
    engine, sessions = await open_store(settings.db_url)
    try:
        svc = cast(Services, SimpleNamespace(sessions=sessions, settings=settings))
        assert await compact.compact(svc, report.batch.id, report.output, report.errors)
        assert await compact.compact(svc, report.batch.id, report.output, report.errors)
    finally:
        await engine.dispose()


@pytest.mark.usefixtures("db_url")
async def test_compaction_changes_no_reader(tmp_path: Path, make_settings: Callable[..., Settings],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", _lines(60))
    monkeypatch.setattr(compact, "KEEP_BODIES", 5)
    async with OllamaSim(SimConfig(num_parallel=4, error_rate=0.3, seed=3)) as sim:
        settings = make_settings(sim.url, max_attempts=1)
        report = await run_whole(monkeypatch, path, settings)
        files = report.output.read_bytes() + report.errors.read_bytes()
        before = await _readers(settings, report.batch.id)
        await compact_twice(settings, report)
        after = await _readers(settings, report.batch.id)
        _equal(before, after)
        assert report.output.read_bytes() + report.errors.read_bytes() == files
        # the result files, the pages and the frame hold every line once
        assert sorted(after["pages"]) == sorted(files.splitlines(keepends=True))
        frame = after["frame"]
        failed = set(frame.filter(pl.col("error_code") == "server_error")["custom_id"])
        assert failed and frame.filter(pl.col("status") == "succeeded")["content"].null_count() < frame.height
    if settings.db_url.startswith("sqlite"):
        rows = _rows(settings)
        done = [r for r in rows if r[1] != "pending"]
        assert all(r[6] is not None and r[3] is None and r[4] is None and r[5] is None for r in done)
        assert all(r[2] == compaction.COMPACTED_BODY for r in done if r[1] == "succeeded" and r[0] > 5)
        assert all(orjson.loads(r[2]) for r in done if r[1] != "succeeded")  # a failed line keeps its body


@pytest.mark.usefixtures("db_url")
async def test_a_retry_of_a_compacted_batch_sends_the_same_lines(tmp_path: Path,
                                                                 make_settings: Callable[..., Settings]) -> None:
    lines = _lines(40)
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4, error_rate=0.3, seed=5)) as sim:
        settings = make_settings(sim.url, max_attempts=1)
        report = await run_batch_file(path, settings=settings, concurrency=4, progress=False)
        frame = await results_frame(settings, report.batch.id)
        failed = list(frame.filter(pl.col("error_code") == "server_error")["custom_id"])
        assert failed
        async with _services(settings, None) as svc:
            retry = await create_retry(svc, report.batch.id)
            sent = (settings.files_dir / f"{retry.input_file_id}.jsonl").read_bytes().splitlines()
    original = {line["custom_id"]: line for line in lines}
    assert [orjson.loads(line) for line in sent] == [original[c] for c in failed]


async def crash_mid_compaction(monkeypatch: pytest.MonkeyPatch, path: Path, settings: Settings) -> None:
    """Run ``path`` into ``settings``' store, the process dying as compaction starts its third page of 8 rows (two
    compacted and committed)."""
    monkeypatch.setattr(compact, "PAGE", 8)
    rewrite = compaction.rewrite_page
    calls = Counter[str]()

    async def crashing(*args: Any, **kwargs: Any) -> None:
        calls["pages"] += 1
        if calls["pages"] == 3:
            raise SystemExit("killed")
        await rewrite(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(compaction, "rewrite_page", crashing)
        with pytest.raises(SystemExit):
            await run_batch_file(path, settings=settings, progress=False)


@pytest.mark.usefixtures("db_url")
async def test_a_crash_between_the_files_and_compaction_loses_and_doubles_nothing(
        tmp_path: Path, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _lines(50)
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        await crash_mid_compaction(monkeypatch, path, settings)
        served = sim.stats.served
        report = await run_batch_file(path, settings=settings, progress=False)  # resumes: finalises again
        assert sim.stats.served == served  # nothing ran twice
    assert report.batch.status == "completed"
    out = report.output.read_bytes().splitlines() + report.errors.read_bytes().splitlines()
    ids = Counter(orjson.loads(line)["custom_id"] for line in out)
    assert ids == Counter(line["custom_id"] for line in lines)  # every input line once
    after = await _readers(settings, report.batch.id)
    assert sorted(after["pages"]) == sorted(line + b"\n" for line in out)
    assert after["frame"]["custom_id"].to_list() == [line["custom_id"] for line in lines]
    if settings.db_url.startswith("sqlite"):
        rows = _rows(settings)
        assert all(r[6] is not None for r in rows)
        with sqlite3.connect(settings.data_dir / "obatch.db") as db:
            assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0  # freed pages went back to the filesystem


@pytest.mark.usefixtures("db_url")
async def test_a_compacted_line_goes_with_its_file(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "nomic-embed-text", "input": f"text {i}"}} for i in range(12)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2)) as sim:
        settings = make_settings(sim.url)
        first = await run_batch_file(path, settings=settings, progress=False)
        again = await run_batch_file(path, settings=settings, progress=False, fresh=True)
        assert sim.stats.requests["/api/embed"] == 12  # the compacted batch's answers served the rerun
        assert all(orjson.loads(line)["obatch"]["cached_from"]["batch_id"] == first.batch.id
                   for line in again.output.read_bytes().splitlines())
        for report in (first, again):
            report.output.unlink()
        engine, sessions = await open_store(settings.db_url)
        try:
            with pytest.raises(errors.NotFoundError, match="is gone"):
                await reading.read_page(sessions, first.batch.id, data_dir=settings.data_dir)
        finally:
            await engine.dispose()
        third = await run_batch_file(path, settings=settings, progress=False, fresh=True)
        assert sim.stats.requests["/api/embed"] == 24  # the answers left the cache with their files
    assert all(orjson.loads(line)["obatch"]["cached_from"] is None for line in third.output.read_bytes().splitlines())


def _results_files(settings: Settings, batch_id: str) -> list[str]:
    with sqlite3.connect(settings.data_dir / "obatch.db") as db:
        return orjson.loads(db.execute("SELECT results_files FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])


async def test_a_moved_data_directory_keeps_its_compacted_batches(tmp_path: Path,
                                                                  make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", _lines(16))
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        first = await run_batch_file(path, settings=settings, progress=False)
        succeeded = first.output.read_bytes().splitlines()
        files = first.output.read_bytes() + first.errors.read_bytes()
        before = await _readers(settings, first.batch.id)
        named = _results_files(settings, first.batch.id)
        assert [settings.data_dir / name for name in named] == [first.output, first.errors]
        assert not any(Path(name).is_absolute() for name in named)  # relative to the data directory
        moved = make_settings(sim.url, data_dir=tmp_path / "elsewhere" / "renamed")
        moved.data_dir.parent.mkdir()
        settings.data_dir.rename(moved.data_dir)  # the store and its files, as a renamed project folder moves them
        assert not settings.data_dir.exists()
        after = await _readers(moved, first.batch.id)
        _equal(before, after)
        assert sorted(after["pages"]) == sorted(files.splitlines(keepends=True))
        served = sim.stats.served
        again = await run_batch_file(path, settings=moved, progress=False, fresh=True)
        assert sim.stats.served == served  # every answer came from the moved batch's files
        rerun = again.output.read_bytes().splitlines()
        assert len(rerun) == len(succeeded)
        assert all(orjson.loads(line)["obatch"]["cached_from"]["batch_id"] == first.batch.id for line in rerun)
        # a store compacted before the paths were relative names its files by their absolute path: still read
        with sqlite3.connect(moved.data_dir / "obatch.db") as db:
            for batch_id, names in db.execute("SELECT id, results_files FROM batches WHERE results_files IS NOT NULL"
                                              ).fetchall():
                absolute = [str(moved.data_dir / name) for name in orjson.loads(names)]
                db.execute("UPDATE batches SET results_files = ? WHERE id = ?", (orjson.dumps(absolute).decode(),
                                                                                 batch_id))
        _equal(before, await _readers(moved, first.batch.id))
        third = await run_batch_file(path, settings=moved, progress=False, fresh=True)
        assert sim.stats.served == served  # the cache read the absolute path too
    assert len(third.output.read_bytes().splitlines()) == len(succeeded)


def test_files_of_reads_relative_and_absolute_names(tmp_path: Path) -> None:
    data = tmp_path / "data"
    names = ["results/b/out.jsonl", "results/b/err.jsonl"]
    relative = BatchRow(id="batch_x", results_files=orjson.dumps(names).decode())
    assert compact.files_of(relative, data) == (data / names[0], data / names[1])
    old = ["/srv/old/data/results/b/out.jsonl", "/srv/old/data/results/b/err.jsonl"]
    absolute = BatchRow(id="batch_x", results_files=orjson.dumps(old).decode())
    assert compact.files_of(absolute, data) == (Path(old[0]), Path(old[1]))  # used as it is
    assert compact.files_of(BatchRow(id="batch_x"), data) is None


async def test_a_run_written_outside_the_store_keeps_its_rows(tmp_path: Path,
                                                              make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", _lines(6))
    async with OllamaSim(SimConfig(num_parallel=2)) as sim:
        settings = make_settings(sim.url)
        await run_batch_file(path, settings=settings, progress=False, output=tmp_path / "out.jsonl",
                             errors_path=tmp_path / "err.jsonl")
    rows = _rows(settings)
    assert all(r[6] is None for r in rows) and any(r[3] for r in rows)  # the user may move those files


# A run of ``obatch run`` that SIGKILLs itself as it compacts its third page of rows (after the files are written
# and two pages are committed): a real kill -9 at that point, with no hook in obatch.
_KILLED_MID_COMPACTION = """
import os, signal, sys
from obatch.batches import compact
from obatch.store import compaction
compact.PAGE = 8
compact.KEEP_BODIES = 4  # the succeeded lines after the fourth move out of requests (obatch.store.finished)
rewrite, pages = compaction.rewrite_page, []
async def killing(*args, **kwargs):
    pages.append(1)
    if len(pages) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    await rewrite(*args, **kwargs)
compaction.rewrite_page = killing
from obatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_compaction_loses_and_doubles_nothing(tmp_path: Path) -> None:
    lines = _lines(40)
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    url, stop = run_in_thread(sim=OllamaSim(SimConfig(num_parallel=4)))
    args, env = killable_run(path, url, tmp_path)
    args = [a for i, a in enumerate(args) if a not in ("-o", "-e") and args[i - 1] not in ("-o", "-e")]
    try:
        killed = subprocess.run([sys.executable, "-c", _KILLED_MID_COMPACTION, *args[3:]], env=env,
                                capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        rows = _rows_of(tmp_path / "data" / "obatch.db")
        assert 0 < sum(r[6] is not None for r in rows) < len(rows)  # killed midway through compaction
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    finally:
        stop()
    assert rerun.returncode == 0, rerun.stderr
    results_dir = next((tmp_path / "data" / "results").iterdir())
    out = [orjson.loads(line) for name in ("output.jsonl", "errors.jsonl")
           for line in (results_dir / name).read_bytes().splitlines()]
    assert Counter(line["custom_id"] for line in out) == Counter(line["custom_id"] for line in lines)
    assert all(r[6] is not None for r in _rows_of(tmp_path / "data" / "obatch.db"))
    with sqlite3.connect(tmp_path / "data" / "obatch.db") as db:
        moved = db.execute("SELECT count(*), count(DISTINCT line) FROM finished_lines").fetchone()
    assert moved == (2 * 8 - 4,) * 2  # the two pages moved before the kill, each line once (the rerun keeps 2,000)
