"""A throwaway PostgreSQL server for tests and soak scripts: ``initdb`` + ``pg_ctl`` into a temporary folder, on a
free loopback port, stopped (and its folder removed) after.

Debian's ``postgresql`` package provides the binaries (``make test`` installs it). PostgreSQL refuses to run as root,
so under root the cluster belongs to the ``postgres`` user the package creates. Durability is switched off (fsync,
synchronous commit): the data is thrown away anyway. ``create_database`` gives each test a database of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from obatch.testing.server import free_port


def bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: Debian's versioned folder first, then PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class PostgresServer:
    root: Path
    port: int
    bindir: Path
    as_user: list[str]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=timeout)

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; `make test` does it).")
        root = Path(tempfile.mkdtemp(prefix="obatch-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        server = cls(root, free_port(), bindir, as_user)
        data = root / "data"
        server._run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                    "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        server._run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w",
                    "-t", "60", "start")
        return server

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL (asyncpg driver)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        for attempt in range(20):  # CREATE DATABASE fails while another one copies the template at the same time
            done = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                   "postgres", "-d", "postgres", "-qc", f"CREATE DATABASE {name}"],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                return self.url(name)
            time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"CREATE DATABASE failed: {done.stderr}")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"


def postgres_server() -> Iterator[PostgresServer]:
    """A server for the length of a generator (a pytest fixture's ``yield from``, or ``contextlib.contextmanager``)."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
