"""Migrations of the benchmark tables: they create exactly what the SQLModel tables declare, and go back down."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from obatch.store import bench_tables, tables  # noqa: F401  (the metadata to compare with)
from obatch.store.db import alembic_config

BENCH = {"bench_runs", "bench_points", "bench_samples"}


def test_migrations_match_the_tables_and_downgrade(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= BENCH
            diff = compare_metadata(MigrationContext.configure(conn, opts={"render_as_batch": True}),
                                    SQLModel.metadata)
            assert diff == []  # autogenerate would find nothing more to do
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
            assert not BENCH & names and {"batches", "requests", "files"} <= names
    finally:
        engine.dispose()


def test_the_start_up_check_knows_alembics_head(tmp_path: Path) -> None:
    """`migrate` skips alembic when the schema is at the head it reads from the version files: that head must be
    alembic's own, and a store left behind is still upgraded."""
    import asyncio

    from alembic.script import ScriptDirectory

    from obatch.store.db import create_engine, head_revision, migrate

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [head_revision()]
    url = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{url}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    engine.dispose()

    async def upgrade_and_read() -> str | None:
        store = create_engine(f"sqlite+aiosqlite:///{url}")
        await migrate(store)
        async with store.connect() as conn:
            version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar()
        await store.dispose()
        return version

    assert asyncio.run(upgrade_and_read()) == head_revision()


POINT = {"run_id": "r", "backend": "sim", "model": "m", "num_ctx": 2048, "concurrency": 4, "repeat": 0,
         "workload": "chat", "created_at": 1.0, "n_requests": 1, "n_completed": 1, "n_failed": 0,
         "success_rate": 1.0, "excluded": False, "wall_seconds": 1.0, "load_seconds": 0.0, "req_per_s": 1.0,
         "output_tps": 1.0}
RUN = {"id": "r", "name": "", "status": "completed", "created_at": 1.0, "backend": "sim", "workload": "chat",
       "workload_json": "{}", "models_json": "[]", "num_ctx_json": "[]", "concurrency_json": "[]", "requests": 1,
       "repeats": 1, "warmup": 0, "seed": 0, "max_failure_rate": 0.05, "signature": "s", "obatch_version": ""}


def _insert(conn: sa.Connection, table: str, row: dict[str, object]) -> None:
    columns = ", ".join(row)
    conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(':' + k for k in row)})"), row)


async def _holding(url: str, before: str, after: str, rows: list[tuple[str, dict[str, object]]]) -> AsyncEngine:
    """A store at revision ``before`` given ``rows`` (table, values), then upgraded to ``after``; the engine to read
    it with (disposed: it reconnects on use, and the caller disposes it again)."""
    from obatch.store.db import create_engine

    await _migrate(url, ("upgrade", before))
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: [_insert(c, table, row) for table, row in rows])
    finally:
        await engine.dispose()
    await _migrate(url, ("upgrade", after))
    return engine


async def _refused(engine: AsyncEngine, table: str, row: dict[str, object]) -> None:
    """Inserting ``row`` into ``table`` breaks one of its keys."""
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await conn.run_sync(_insert, table, row)


async def _migrate(url: str, *steps: tuple[str, str]) -> None:
    """Alembic commands on the async engine obatch uses (``upgrade``/``downgrade`` to a revision, in order)."""
    from obatch.store.db import create_engine

    engine = create_engine(url)
    try:
        for verb, revision in steps:
            async with engine.begin() as conn:
                await conn.run_sync(lambda c, v=verb, r=revision: getattr(command, v)(alembic_config(c), r))
    finally:
        await engine.dispose()


async def test_0008_keeps_concurrency_points_and_keys_rate_points_apart(db_url: str | None, tmp_path: Path) -> None:
    """Old points become closed-loop points (NULL rate); a rate point with the same run, model, num_ctx, cap and
    repeat is a different point, while a second closed-loop point with the same key is still refused; down again,
    the rate points go (the old schema cannot tell them apart) and the old unique key is back."""
    url = db_url or f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    engine = await _holding(url, "0007_estimates", "0008_rate", [("bench_runs", RUN), ("bench_points", POINT)])
    try:
        async with engine.begin() as conn:
            rows = (await conn.execute(sa.text("SELECT concurrency, rate, arrival FROM bench_points"))).all()
            assert [tuple(r) for r in rows] == [(4, None, None)]
            for arrival in ("poisson", "constant"):
                await conn.run_sync(_insert, "bench_points", POINT | {"rate": 2.0, "arrival": arrival})
            await conn.run_sync(_insert, "bench_points", POINT | {"rate": 4.0, "arrival": "poisson"})
        for duplicate in (POINT, POINT | {"rate": 2.0, "arrival": "poisson"}):
            await _refused(engine, "bench_points", duplicate)
        await engine.dispose()
        await _migrate(url, ("downgrade", "0007_estimates"))
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT count(*) FROM bench_points"))).scalar() == 1
        await _refused(engine, "bench_points", POINT)
        await engine.dispose()
        await _migrate(url, ("upgrade", "head"))
    finally:
        await engine.dispose()


PILOT = {"file_sha256": "f", "custom_id": "c", "body_sha256": "b", "model": "m", "url": "/v1/chat/completions",
         "result_json": "{}", "created_at": 1.0}
SWEEP = {"id": "sweep_1", "owner": "key_a", "status": "completed", "created_at": 1.0, "points_total": 6,
         "points_done": 6,
         "params_json": '{"models": ["m"], "num_ctx": [2048, 4096], "concurrency": [1, 2], "rates": [0.5], '
                        '"requests": 8, "repeats": 1}'}


async def test_reuse2_gives_pilots_an_owner_and_sweeps_their_requests(db_url: str | None, tmp_path: Path) -> None:
    """Pilot lines become the local owner's and are keyed by owner too (another owner may hold the same line);
    a sweep's requests are counted from its parameters (1 model × 2 num_ctx × 3 levels × 8 requests). Down again,
    only the local owner's lines stay."""
    url = db_url or f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    engine = await _holding(url, "compact_0011", "reuse2_owners", [("pilots", PILOT), ("bench_sweeps", SWEEP)])
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT owner, custom_id FROM pilots"))).all() == [("", "c")]
            assert (await conn.execute(sa.text("SELECT requests FROM bench_sweeps"))).scalar() == 48
            await conn.run_sync(_insert, "pilots", PILOT | {"owner": "key_b"})
        await _refused(engine, "pilots", PILOT | {"owner": "key_b"})
        await engine.dispose()
        await _migrate(url, ("downgrade", "compact_0011"))
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT custom_id FROM pilots"))).scalars().all() == ["c"]
        await _refused(engine, "pilots", PILOT)
        await engine.dispose()
        await _migrate(url, ("upgrade", "head"))
    finally:
        await engine.dispose()
