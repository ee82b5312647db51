"""What a finished batch leaves on disk: the store beside its input copy and its output file.

An embeddings batch of N lines runs on the Ollama simulator (in this process) into a fresh SQLite store through
``obatch.run_batch_file`` (as ``obatch run`` does), and once it is final the sizes are printed: the stored input copy,
the output file, and the store as the filesystem holds it (the database file and its WAL), with its live pages
(those not on SQLite's free list) and its ratio to the output file. Target: the store at most 0.25 × the output
file. The store's own tables and indexes are listed with their share (SQLite's ``dbstat``).

    python perf/store_disk.py [--lines 200000] [--concurrency 32] [--dims 32]

``--dims 1`` gives the smallest embedding line obatch writes (about 690 bytes with its provenance block).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from obatch.api import run_batch_file
from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig, _default_models


def write_input(path: Path, lines: int) -> None:
    with path.open("wb") as handle:
        for i in range(lines):
            handle.write(orjson.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/embeddings",
                                       "body": {"model": "nomic-embed-text", "input": f"Text number {i} to embed."}})
                         + b"\n")


def store_figures(store: Path) -> tuple[int, int, list[tuple[str, int]]]:
    """(bytes on disk: the database and its WAL, bytes of live pages, the largest tables and indexes by bytes)."""
    on_disk = sum(p.stat().st_size for p in (store, store.with_name(store.name + "-wal")) if p.exists())
    with sqlite3.connect(store) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        live = (db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0])
        parts = db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 6").fetchall()
    return on_disk, live * page_size, [(str(n), int(b)) for n, b in parts]


def sim_config(concurrency: int, dims: int) -> SimConfig:
    """The simulator with its embedding model answering vectors of ``dims`` numbers (its default: 32; the real
    nomic-embed-text: 768)."""
    models = tuple(dataclasses.replace(m, embedding_length=dims) if m.name == "nomic-embed-text" else m
                   for m in _default_models())
    return SimConfig(num_parallel=concurrency, models=models)


def time_compaction() -> list[float]:
    """Seconds spent compacting and handing pages back, summed (empty where this obatch has no compaction)."""
    try:
        from obatch.batches import compact
    except ImportError:
        return []
    spent = [0.0]

    def timed(work: Any) -> Any:
        async def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await work(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return run

    compact.compact = timed(compact.compact)
    compact.release = timed(compact.release)
    return spent


async def main(lines: int, concurrency: int, dims: int) -> None:
    compacting = time_compaction()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "in.jsonl"
        write_input(source, lines)
        async with OllamaSim(sim_config(concurrency, dims)) as sim:
            settings = Settings(_env_file=None, data_dir=root / "data", backend="ollama",
                                ollama_url=sim.url, max_lines=max(lines, 50_000), max_file_bytes=1 << 34)
            started = time.perf_counter()
            report = await run_batch_file(source, settings=settings, concurrency=concurrency, progress=False)
            seconds = time.perf_counter() - started
        inputs = sum(p.stat().st_size for p in settings.files_dir.glob("*.jsonl"))
        output = report.output.stat().st_size + report.errors.stat().st_size
        on_disk, live, parts = store_figures(settings.data_dir / "obatch.db")
    mb = 1e6
    print(f"{lines} embeddings lines of {dims} numbers, {report.batch.completed} succeeded in {seconds:.1f} s "
          "(finalisation included)")
    print(f"input copy {inputs / mb:.1f} MB; output and error files {output / mb:.1f} MB "
          f"({output / lines:.0f} bytes a line)")
    print(f"store on disk {on_disk / mb:.1f} MB = {on_disk / output:.3f} × the output "
          f"({on_disk / lines:.0f} bytes a line); live pages {live / mb:.1f} MB = {live / output:.3f} ×")
    if compacting:
        print(f"compaction: {compacting[0]:.1f} s of the run")
    print("largest parts: " + ", ".join(f"{name} {size / mb:.1f} MB" for name, size in parts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--dims", type=int, default=32, help="numbers in an embedding (the simulator's default: 32)")
    args = parser.parse_args()
    asyncio.run(main(args.lines, args.concurrency, args.dims))
