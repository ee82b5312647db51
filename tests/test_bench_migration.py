"""Migration 0002 (benchmark tables): it creates exactly what the SQLModel tables declare, and goes back down."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
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
