"""Several processes on one store: leases, takeover, the import race, idempotent finalisation, on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel, col, select

from obatch import batches, lease
from obatch.api import run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.config import Settings
from obatch.store import leases
from obatch.store.db import Sessions, open_store
from obatch.store.tables import BatchRow, FileRow, LeaseRow
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import chat_line, write_jsonl
from tests.test_batches import assert_exactly_once

pytestmark = pytest.mark.usefixtures("db_url")


async def _store(settings: Settings) -> tuple[sa.ext.asyncio.AsyncEngine, Sessions]:
    return await open_store(settings.db_url)


async def test_migrations_match_the_tables(make_settings: Callable[..., Settings]) -> None:
    engine, _ = await _store(make_settings())
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"render_as_batch": True}), SQLModel.metadata))
            wide = await conn.run_sync(lambda c: {
                column["name"]: str(column["type"]) for column in sa.inspect(c).get_columns("batches")})
    finally:
        await engine.dispose()
    assert diff == []
    if engine.dialect.name == "postgresql":
        assert wide["created_at"] == "BIGINT" and wide["input_tokens"] == "BIGINT"


async def test_a_store_created_while_another_process_writes_it_opens(tmp_path: Path, db_url: str | None) -> None:
    """Processes starting together on a new SQLite store: while one writes, another's switch to WAL is answered
    "database is locked" at once (SQLite does not wait out its busy timeout there). It waits its turn instead."""
    if db_url is not None:
        pytest.skip("a SQLite store's creation")
    path = tmp_path / "obatch.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("CREATE TABLE other (a)")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO other VALUES (1)")
        asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
        engine, _ = await open_store(f"sqlite+aiosqlite:///{path}")
        try:
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
                assert (await conn.exec_driver_sql("SELECT count(*) FROM batches")).scalar() == 0
        finally:
            await engine.dispose()
    finally:
        holder.close()


async def test_a_lease_is_claimed_once_renewed_released_and_taken_over_after_expiry(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(lease_ttl=10.0)
    engine, sessions = await _store(settings)
    try:
        now = 1000.0
        # Claims racing at the same instant: exactly one wins.
        claims = await asyncio.gather(*(_claim(sessions, "batch-x", owner, now) for owner in ("a", "b", "c")))
        assert sum(holder is None for holder in claims) == 1
        winner = ["a", "b", "c"][[holder is None for holder in claims].index(True)]
        other = "b" if winner != "b" else "c"
        assert await _claim(sessions, "batch-x", winner, now + 1) is None  # ours already: claiming again renews
        holder = await _claim(sessions, "batch-x", other, now + 5)
        assert holder is not None and holder.owner == winner
        async with sessions() as session:
            assert await leases.renew_lease(session, "batch-x", winner, now + 9, 10.0)
            assert not await leases.renew_lease(session, "batch-x", other, now + 9, 10.0)
            await session.commit()
        assert await _claim(sessions, "batch-x", other, now + 18) is not None  # renewed at 9: held until 19
        assert await _claim(sessions, "batch-x", other, now + 19.5) is None  # expired: taken over
        async with sessions() as session:
            assert not await leases.renew_lease(session, "batch-x", winner, now + 20, 10.0)  # the old owner knows
            await leases.release_lease(session, "batch-x", winner)  # not ours any more: nothing happens
            await session.commit()
            assert (await session.get(LeaseRow, "batch-x")) is not None
            await leases.release_lease(session, "batch-x", other)
            await session.commit()
            assert (await session.get(LeaseRow, "batch-x")) is None
    finally:
        await engine.dispose()


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "no-errors.jsonl"
    path.write_bytes(b"")
    return path


async def _claim(sessions: Sessions, batch_id: str, owner: str, now: float) -> LeaseRow | None:
    async with sessions() as session:
        holder = await leases.claim_lease(session, batch_id, owner, now, 10.0)
        await session.commit()
        return holder


async def _batch(svc: batches.Services, path: Path) -> str:
    stored = await batches.store_file(svc, batches.read_chunks(path), filename=path.name, purpose="batch")
    batch = await batches.create_batch(svc, input_file_id=stored.id, endpoint="/v1/chat/completions")
    return batch.id


async def test_two_processes_on_one_batch_import_once_and_run_each_line_once(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """The import race (two processes importing one batch) and the run race: the second process is refused."""
    lines = [chat_line(f"r{i}", max_tokens=4) for i in range(300)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        engine, sessions = await _store(settings)
        backend = OllamaBackend(sim.url)
        one = batches.Services(settings, sessions, backend)
        two = batches.Services(settings, sessions, backend)  # another owner: another process
        batch_id = await _batch(one, path)
        outcomes = await asyncio.gather(batches.process(one, batch_id),
                                        batches.process(two, batch_id), return_exceptions=True)
        assert sorted(type(o).__name__ for o in outcomes) == ["BatchBusy", "BatchRow"], outcomes
        busy = next(o for o in outcomes if isinstance(o, lease.BatchBusy))
        assert busy.status_code == 409 and "another process" in busy.message
        done = await batches.process(two, batch_id)  # after the fact: already final, nothing to do
        served = sim.stats.answered["/api/chat"]  # the lines (the slot count's requests go to /api/generate)
        await backend.aclose()
        async with sessions() as session:
            assert (await session.get(LeaseRow, batch_id)) is None  # released at the end
        await engine.dispose()
    assert done.status == "completed" and (done.total, done.completed, done.failed) == (300, 300, 0)
    assert served == 300
    assert_exactly_once([line["custom_id"] for line in lines],
                        batches.file_path(settings, done.output_file_id or ""), _empty(tmp_path))


async def test_a_dead_process_s_batch_is_taken_over_after_its_lease_expires(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", max_tokens=20) for i in range(80)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as sim:
        settings = make_settings(sim.url, lease_ttl=1.0, lease_heartbeat=0.2)
        engine, sessions = await _store(settings)
        backend = OllamaBackend(sim.url)
        dead = batches.Services(settings, sessions, backend)
        batch_id = await _batch(dead, path)
        task = asyncio.create_task(batches.process(dead, batch_id))
        while (await batches.reload(dead, batch_id)).completed < 10:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.02)
        # Freeze the first process as SIGKILL would: its heartbeat stops, its lease row stays.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        async with sessions() as session:
            await session.execute(sa.insert(LeaseRow).values(batch_id=batch_id, owner=dead.owner, claimed_at=0,
                                                              heartbeat=dead.clock(),
                                                              expires_at=dead.clock() + 1.0))
            await session.commit()
        before = sim.stats.served
        heir = batches.Services(settings, sessions, backend)
        with pytest.raises(lease.BatchBusy):
            await batches.process(heir, batch_id)
        await asyncio.sleep(1.1)
        done = await batches.process(heir, batch_id)
        after = sim.stats.served
        await backend.aclose()
        await engine.dispose()
    assert done.status == "completed" and done.completed == 80
    assert after - before <= 80 - 10 + 2  # only what was missing (a cancelled request may have reached the sim)
    assert_exactly_once([line["custom_id"] for line in lines],
                        batches.file_path(settings, done.output_file_id or ""), _empty(tmp_path))


async def test_a_process_that_loses_its_lease_stops(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", max_tokens=40) for i in range(60)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as sim:
        settings = make_settings(sim.url, lease_ttl=5.0, lease_heartbeat=0.1)
        engine, sessions = await _store(settings)
        backend = OllamaBackend(sim.url)
        svc = batches.Services(settings, sessions, backend)
        batch_id = await _batch(svc, path)
        task = asyncio.create_task(batches.process(svc, batch_id))
        while (await batches.reload(svc, batch_id)).completed < 4:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.02)
        async with sessions() as session:  # another process took it over (say this one stalled past the ttl)
            await session.execute(sa.update(LeaseRow).where(col(LeaseRow.batch_id) == batch_id)
                                  .values(owner="someone-else"))
            await session.commit()
        with pytest.raises(lease.LeaseLost):
            await asyncio.wait_for(task, 10)
        batch = await batches.reload(svc, batch_id)
        await backend.aclose()
        await engine.dispose()
    assert batch.status == "in_progress" and batch.completed < 60  # left for the new holder to finish


async def test_finalising_twice_leaves_one_set_of_files(tmp_path: Path, make_settings: Callable[..., Settings]
                                                        ) -> None:
    """A crash during finalisation is repaired by finalising again: same file ids, no orphan rows."""
    lines = [chat_line(f"r{i}") for i in range(20)] + [chat_line("bad", model="no-such-model")]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim() as sim:
        settings = make_settings(sim.url)
        engine, sessions = await _store(settings)
        backend = OllamaBackend(sim.url)
        svc = batches.Services(settings, sessions, backend)
        batch_id = await _batch(svc, path)
        first = await batches.process(svc, batch_id)
        async with sessions() as session:  # as if the process died after writing files, before the status
            await session.execute(sa.update(BatchRow).where(col(BatchRow.id) == batch_id)
                                  .values(status="finalizing", completed_at=None))
            await session.commit()
        again = await batches.process(svc, batch_id)
        async with sessions() as session:
            files = (await session.execute(select(FileRow).where(col(FileRow.purpose) == "batch_output"))
                     ).scalars().all()
        await backend.aclose()
        await engine.dispose()
    assert again.status == "completed" and (again.completed, again.failed) == (20, 1)
    assert (again.output_file_id, again.error_file_id) == (first.output_file_id, first.error_file_id)
    assert sorted(f.id for f in files) == sorted([first.output_file_id, first.error_file_id])
    assert sorted(p.name for p in settings.files_dir.iterdir()) == sorted(
        f"{f}.jsonl" for f in (first.output_file_id, first.error_file_id, again.input_file_id))
    assert_exactly_once([str(line["custom_id"]) for line in lines],
                        batches.file_path(settings, again.output_file_id or ""),
                        batches.file_path(settings, again.error_file_id or ""))


async def test_obatch_run_started_twice_runs_the_batch_once(tmp_path: Path, make_settings: Callable[..., Settings]
                                                           ) -> None:
    """A second ``run_batch_file`` on the same input (another terminal) waits for the first instead of running
    the lines again, and still gets its own output file.

    The first run takes about 6 s (60 lines of 0.2 s, two at a time), so the second starts while it runs even on a
    loaded machine. Every wait is bounded: a stall fails within a minute, saying where the batch and its lease stand.
    """
    lines = [chat_line(f"r{i}", max_tokens=20) for i in range(60)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=100)) as sim:
        settings = make_settings(sim.url, lease_heartbeat=0.2)
        engine, sessions = await _store(settings)
        first = asyncio.create_task(run_batch_file(path, settings=settings, concurrency=2, progress=False))
        try:
            async with _stall_reported(sessions, "the first run did not reach its fifth line", first):
                while not (rows := await _batches(sessions)) or rows[0].completed < 5:
                    if first.done():  # it ended (or failed) before the second started: show why
                        await first
                        pytest.fail(f"the first run ended before the second started: {rows}")
                    await asyncio.sleep(0.02)
            async with _stall_reported(sessions, "the second run did not return", first):
                second = await run_batch_file(path, settings=settings, concurrency=2, progress=False,
                                              output=tmp_path / "second.jsonl",
                                              errors_path=tmp_path / "second-err.jsonl")
            async with _stall_reported(sessions, "the first run did not return", first):
                report = await first
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await engine.dispose()
        served = sim.stats.served
    assert second.batch.id == report.batch.id, "the second run did not find the first's batch"
    assert second.batch.status == "completed"
    assert served == 60
    expected = [str(line["custom_id"]) for line in lines]
    assert_exactly_once(expected, report.output, report.errors)
    assert_exactly_once(expected, second.output, second.errors)


async def _batches(sessions: Sessions) -> list[BatchRow]:
    async with sessions() as session:
        return list((await session.execute(select(BatchRow))).scalars().all())


@contextlib.asynccontextmanager
async def _stall_reported(sessions: Sessions, what: str, first: asyncio.Task[Any], within: float = 60.0
                          ) -> AsyncIterator[None]:
    """Fail (not hang until the suite's timeout) when the body takes longer than ``within`` seconds, with the
    batches' progress, the leases and the first run's state in the message."""
    try:
        async with asyncio.timeout(within):
            yield
    except TimeoutError:
        async with sessions() as session:
            lease_rows = (await session.execute(select(LeaseRow))).scalars().all()
        batches_now = [(b.id, b.status, b.completed, b.failed, b.total) for b in await _batches(sessions)]
        leases_now = [(row.owner, round(row.expires_at - time.time(), 1)) for row in lease_rows]
        state = "running" if not first.done() else repr(first.exception()) if not first.cancelled() else "cancelled"
        pytest.fail(f"{what} in {within:.0f} s: batches {batches_now}, leases (owner, expires in s) {leases_now}, "
                    f"first run {state}")


async def test_a_renewal_kept_waiting_gives_up_before_the_lease_expires(make_settings: Callable[..., Settings],
                                                                      db_url: str | None) -> None:
    """A renewal kept waiting (here a PostgreSQL row lock another transaction holds; it would wait for good) is
    given up in time: the holder stops while its lease still holds, before another process may take it over."""
    if db_url is None:
        pytest.skip("a PostgreSQL row lock (SQLite's lock wait cannot be interrupted)")
    settings = make_settings(lease_ttl=3.0, lease_heartbeat=0.5)
    engine, sessions = await _store(settings)
    started = time.monotonic()
    try:
        async with sessions() as other:
            with pytest.raises(lease.LeaseLost):
                async with asyncio.timeout(20), lease.hold(sessions, settings, "batch-x", "owner-a"):
                    await other.execute(select(LeaseRow).where(col(LeaseRow.batch_id) == "batch-x").with_for_update())
                    await asyncio.sleep(30)
            stopped = time.monotonic() - started
    finally:
        await engine.dispose()
    assert stopped < settings.lease_ttl
