"""What finding prefix groups costs at import: the prefix key of every line against the whole import of the file.

Writes a batch file of N lines (documents x questions: each line a ~1,600-character document and a question, so
every line has a key; shuffled), imports it into a fresh SQLite store as ``obatch run`` does (``validate_and_import``:
parse, check, estimate, key, insert), then times the keys alone (``obatch.prefix.prefix_key`` over the parsed
bodies, less the parsing) and the scheduler's lookahead over the imported rows (``Scheduler.load``: the rows'
keys read back and grouped, with its memory). Prints the seconds of each and the keys' share of the import.

    python perf/prefix_import.py [--lines 1000000] [--questions 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson

from obatch import context
from obatch.backends import open_backend
from obatch.batches import Services, create_batch, store_file
from obatch.batches.files import read_chunks, validate_and_import
from obatch.config import Settings
from obatch.prefix import prefix_key
from obatch.runner import Job
from obatch.schedule import Scheduler
from obatch.store import repo
from obatch.store.db import open_store


def write_file(path: Path, lines: int, questions: int) -> None:
    rng = random.Random(24)
    docs = max(1, lines // questions)
    texts = [" ".join(f"word{rng.randrange(100_000)}" for _ in range(180)) for _ in range(min(docs, 5000))]
    order = list(range(lines))
    rng.shuffle(order)
    with path.open("wb") as handle:
        for i in order:
            d, q = divmod(i, questions)
            body = {"model": "llama3.2:1b", "max_tokens": 32, "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"Document {d}: {texts[d % len(texts)]}\n\nQuestion {q}?"}]}
            handle.write(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": body}) + b"\n")


def time_keys(path: Path) -> tuple[float, float]:
    """(seconds to parse every line, seconds to parse and key every line)."""
    raw = path.read_bytes().splitlines()
    started = time.perf_counter()
    for line in raw:
        orjson.loads(line)
    parse = time.perf_counter() - started
    started = time.perf_counter()
    for line in raw:
        request = orjson.loads(line)
        prefix_key(request["url"], request["body"])
    return parse, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--questions", type=int, default=20, help="lines sharing each document")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        write_file(path, args.lines, args.questions)
        print(f"{args.lines:,} lines, {path.stat().st_size / 1e6:,.0f} MB, {args.questions} lines a document",
              flush=True)
        settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", max_lines=args.lines,
                            max_file_bytes=path.stat().st_size + 1, backend="ollama")
        engine, sessions = await open_store(settings.db_url)
        backend = await open_backend(settings)
        try:
            svc = Services(settings, sessions, backend)
            stored = await store_file(svc, read_chunks(path), filename="in.jsonl", purpose="batch")
            batch = await create_batch(svc, input_file_id=stored.id, endpoint=None, completion_window="7d")
            started = time.perf_counter()
            await validate_and_import(svc, batch)
            imported = time.perf_counter() - started
            assert batch.status == "in_progress", batch.errors_json
            async with sessions() as session:
                groups, grouped = await repo.prefix_group_counts(session, batch.id)
            parse, keyed = await asyncio.to_thread(time_keys, path)
            keys = keyed - parse

            async def fetch(lines: object) -> list[Job]:
                return []

            started = time.perf_counter()
            await Scheduler.load(sessions, batch.id, "llama3.2:1b", fetch,
                                 default_budget=context.DEFAULT_OUTPUT_BUDGET)
            lookahead = time.perf_counter() - started
            tracemalloc.start()  # again, for its memory (tracemalloc slows it down)
            scheduler = await Scheduler.load(sessions, batch.id, "llama3.2:1b", fetch,
                                             default_budget=context.DEFAULT_OUTPUT_BUDGET)
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del scheduler
        finally:
            await backend.aclose()
            await engine.dispose()
    print(f"import (parse, check, estimate, key, insert): {imported:8.1f} s  ({args.lines / imported:,.0f} lines/s)")
    print(f"prefix keys alone:                            {keys:8.2f} s  ({keys / imported:.1%} of the import; "
          f"{keys / args.lines * 1e6:.2f} µs a line)")
    print(f"groups found: {groups:,} holding {grouped:,} lines")
    print(f"scheduler lookahead (read keys back, group):  {lookahead:8.1f} s; holds {held / 1e6:,.0f} MB "
          f"({held / args.lines:.0f} bytes a line), peak {peak / 1e6:,.0f} MB while reading")


if __name__ == "__main__":
    asyncio.run(main())
