"""Database engine factory and schema migrations (Alembic), SQLite in WAL mode by default.

The engine is created by whoever owns the process (CLI command, server lifespan, notebook call) and passed down;
nothing here is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"

Sessions = async_sessionmaker[AsyncSession]

if TYPE_CHECKING:
    from alembic.config import Config


def _sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[-1]
    return path if path and path != ":memory:" else None


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _switch_to_wal(path: str) -> None:
    """Put a SQLite file in WAL mode before any pooled connection opens it (once in WAL, it stays so, and asking
    again takes no lock). Processes creating one store at once race for this switch, and SQLite answers the losers
    "database is locked" at once, without waiting out the busy timeout: they try again."""
    def switch() -> None:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
            # a new store frees pages incrementally (a compacted batch's pages go back to the filesystem); on a store
            # that has tables already this does nothing (only VACUUM changes it)
            connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
            connection.execute("PRAGMA journal_mode=WAL")

    try:
        switch()
    except sqlite3.OperationalError as exc:
        if not _locked(exc):
            raise
        from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

        wait = wait_exponential_jitter(multiplier=0.01, max=0.25, jitter=0.01)
        for attempt in Retrying(retry=retry_if_exception(_locked), wait=wait, stop=stop_after_delay(30), reraise=True):
            with attempt:
                switch()


SQLITE_OVERFLOW = 128  # connections beyond the pool's 5, opened under bursts and closed after them


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine; for SQLite, the parent folder is created and WAL + busy timeout are switched on."""
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Writers wait for SQLite's one write lock holding a connection; with the default pool (5 + 10) twenty
        # uploads committing while the batch process wrote took every connection, and reads (which WAL never makes
        # wait) queued behind them for 0.2-0.5 s. Connections to a local file are cheap: room for reads too.
        in_memory = make_url(url).database in (None, "", ":memory:")  # one static connection: no pool to size
        pool: dict[str, Any] = {} if in_memory else {"max_overflow": SQLITE_OVERFLOW}
        engine = create_async_engine(url, connect_args={"timeout": 30}, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True)


def sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest migration's revision, read from the version files (the one no other revises)."""
    revisions, revised = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        if found := re.search(r"^revision: str = ['\"]([^'\"]+)['\"]", source, re.M):
            revisions.add(found.group(1))
        if found := re.search(r"^down_revision: [^=]+= ['\"]([^'\"]+)['\"]", source, re.M):
            revised.add(found.group(1))
    heads = revisions - revised
    if len(heads) != 1:
        raise RuntimeError(f"The migrations must have one head, not {sorted(heads)}.")
    return heads.pop()


def _current_revision(conn: Connection) -> str | None:
    if not conn.dialect.has_table(conn, "alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade(conn: Connection) -> None:
    from alembic import command  # only when the schema is behind: importing alembic is a tenth of start-up

    command.upgrade(alembic_config(conn), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration (idempotent; safe at every start, by several processes at once)."""
    head = await asyncio.to_thread(head_revision)
    async with engine.connect() as conn:
        if await conn.run_sync(_current_revision) == head:
            return  # the usual start: nothing to do, and no alembic to import
    async with engine.begin() as conn:
        # Several processes may start at once on one store: the first migrates, the others wait and find it done.
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(4242424242)")
        elif engine.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        await conn.run_sync(_upgrade)


async def open_store(url: str) -> tuple[AsyncEngine, Sessions]:
    engine = create_engine(url)
    if path := _sqlite_path(url):
        await asyncio.to_thread(_switch_to_wal, path)
    await migrate(engine)
    return engine, sessions(engine)
