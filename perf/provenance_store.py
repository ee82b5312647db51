"""What provenance costs the store: bytes per line that a finished batch's rows gain from it.

A batch of N chat lines (half of them with a ``seed``) runs on the Ollama simulator into a fresh SQLite store. A
line keeps only a small number naming its host (``requests.host``), its seed and the answers the structured-output
check refused; the host's URL, engine, version and model digest are kept once on the batch (``engines_json``). The
store is copied twice, VACUUMed, and once without those three columns: the difference, per line, is what
provenance adds to the store. The output file's lines carry the joined facts in full; their growth is printed too.

    python perf/provenance_store.py [--lines 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

import orjson

from obatch.api import run_batch_file
from obatch.batches.provenance import LINE_FIELDS
from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig

COLUMNS = ("host", "seed", "refused")


def _line(i: int) -> bytes:
    body: dict[str, object] = {"model": "llama3.2:1b", "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"Question number {i}?"}]}
    if i % 2:
        body["seed"] = 1_000_000 + i
    return orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + b"\n"


def _vacuumed(source: Path, target: Path, drop: tuple[str, ...] = ()) -> tuple[int, int]:
    """(the file's bytes, the requests table's record bytes: SQLite's dbstat ``payload``), VACUUMed."""
    shutil.copyfile(source, target)
    db = sqlite3.connect(target, isolation_level=None)
    try:
        for column in drop:
            db.execute(f"ALTER TABLE requests DROP COLUMN {column}")
        db.execute("VACUUM")
        payload = db.execute("SELECT sum(payload) FROM dbstat WHERE name = 'requests'").fetchone()[0]
    finally:
        db.close()
    return target.stat().st_size, int(payload)


async def main(lines: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "in.jsonl"
        path.write_bytes(b"".join(_line(i) for i in range(lines)))
        async with OllamaSim(SimConfig(num_parallel=8)) as sim:
            settings = Settings(_env_file=None, data_dir=root / "data", backend="ollama",  # type: ignore[call-arg]
                                ollama_url=sim.url)
            report = await run_batch_file(path, settings=settings, concurrency=8, progress=False)
        store = root / "data" / "obatch.db"
        with_columns = _vacuumed(store, root / "with.db")
        without = _vacuumed(store, root / "without.db", COLUMNS)
        with sqlite3.connect(root / "with.db") as db:
            engines = db.execute("SELECT length(engines_json) FROM batches").fetchone()[0]
        output = [orjson.loads(line) for line in report.output.read_bytes().splitlines()]
        grown = sum(len(orjson.dumps({k: line["obatch"][k] for k in (*LINE_FIELDS, "seed", "refused_answers")}))
                    for line in output)
    print(f"{lines} lines, {report.batch.completed} succeeded; store VACUUMed: {with_columns[0]:,} bytes with the "
          f"provenance columns, {without[0]:,} without (SQLite pages of 4 KiB)")
    print(f"store: {(with_columns[1] - without[1]) / lines:.2f} bytes per line added to the request rows (host, "
          f"seed, refused; {with_columns[1] / lines:.0f} bytes a row in all); the batch's engines_json: "
          f"{engines} bytes once")
    print(f"output file: {grown / lines:.0f} bytes per line of provenance fields (the joined facts, in full)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().lines))
