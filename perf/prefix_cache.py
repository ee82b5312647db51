"""What does the order of a batch's lines cost when they share prompt prefixes, and what does obatch's scheduler win?

An Ollama simulator with a prompt cache per slot (``--prompt-cache``: a request takes the free slot whose last
prompt shares the longest prefix with its own, and only the rest of its prompt costs time) runs four files:
  documents   D documents of ~1,400 tokens x Q questions each, a short shared system prompt, shuffled
  system      one long shared system prompt (~1,400 tokens), a different short question on each line
  control     lines of the same length that share nothing but the chat template
  mixed       short prompts that share nothing, answers of mixed lengths (4 in 5 short, 1 in 5 up to 512
              tokens), shuffled: what starting the longest first does to the batch's tail
each through these clients, on a fresh simulator every time (empty caches):
  file order  a bare aiohttp client, N requests in flight, in the file's order
  grouped     the same, each document's questions together
  affinity    N workers; each takes one document at a time and sends its questions one after another
  obatch      ``obatch run`` (``run_batch_file``, what the CLI runs) with its default settings: auto concurrency,
              ``--schedule auto`` (obatch.schedule)
  obatch file the same with ``--schedule file``
  obatch c=N  and obatch c=N file: the same two at a concurrency fixed at N (auto's climb from 1 left out)
  obatch again  ``obatch run`` with no flag a second time, in the data directory of a first (untimed) run of the
              same file against the same engine host: the first runs on a simulator at the port the timed one then
              takes (a restarted engine, its prompt cache cold), and the second, with the response cache off so the
              engine answers every line again, starts where the first found the slots (obatch.batches.slots)
  obatch new host  the same, but the timed simulator listens on another port: the data directory and its store
              exist (as for a user's every run but the first), the engine host is one it has not seen, so its slots
              are counted (obatch.backends.ollama: count_slots)
N is the simulator's number of slots. Prompt processing dominates, as on a real engine: a miss costs ~1,400
tokens of prompt time, an answer 8 tokens of decode; the prompt rate is the model's, shared by the prompts in
progress at once (``--prompt-tps-shared``), the decode rate is each slot's. The simulator runs in this process (a
thread), so the cached prompt tokens are read from its counters. Wall times include everything a client does;
obatch's include its store (a new data directory per run) but not its imports (a one-line run warms it up). The tail
is the time from 95% of the lines done to the last.

    python perf/prefix_cache.py [--documents 8] [--questions 12] [--slots 8] [--prompt-tps 40000 [--per-slot]]
                                [--repeats 1] [--files documents,system,control,mixed] [--clients ...]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import orjson

from obatch.api import run_batch_file
from obatch.config import Settings
from obatch.store import repo
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, count_tokens, run_in_thread

MODEL = "llama3.2:1b"
ANSWER_TOKENS = 8
LONG_ANSWER = 512
WORDS = ("river", "stone", "ledger", "harbour", "signal", "measure", "winter", "engine", "orchard", "copper",
         "lantern", "census", "market", "glacier", "archive", "meadow", "tariff", "beacon", "quarry", "estuary")
TOPICS = ("the dates", "the people named", "the main claim", "the numbers", "the places", "the risks", "the tone",
          "the sources", "the conclusion", "the method", "the open questions", "the costs", "the timeline",
          "the assumptions", "the audience", "the title")
SYSTEM = "You answer questions about the document you are given. Answer in one short sentence."


@dataclass(frozen=True)
class Line:
    group: str  # what the affinity client keeps on one slot: the document (or the line itself)
    messages: list[dict[str, str]]
    max_tokens: int = ANSWER_TOKENS


def prose(rng: random.Random, tokens: int) -> str:
    """Text of about ``tokens`` simulator tokens (4 characters each)."""
    words: list[str] = []
    while count_tokens(" ".join(words)) < tokens:
        words.append(rng.choice(WORDS) + str(rng.randrange(1000)))
    return " ".join(words)


def documents_file(rng: random.Random, docs: int, questions: int, tokens: int) -> list[Line]:
    lines = []
    for d in range(docs):
        text = prose(rng, tokens)
        for q in range(questions):
            ask = f"Document {d}:\n{text}\n\nQuestion: what does it say about {TOPICS[q % len(TOPICS)]} ({q})?"
            lines.append(Line(f"doc{d}", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]))
    rng.shuffle(lines)
    return lines


def system_file(rng: random.Random, n: int, tokens: int) -> list[Line]:
    rubric = "Grade the answer below against this rubric.\n" + prose(rng, tokens)
    return [Line(f"line{i}", [{"role": "system", "content": rubric},
                              {"role": "user", "content": f"Answer {i}: {prose(rng, 24)}"}]) for i in range(n)]


def control_file(rng: random.Random, n: int, tokens: int) -> list[Line]:
    return [Line(f"line{i}", [{"role": "system", "content": f"{i} {SYSTEM}"},
                              {"role": "user", "content": f"Note {i}:\n{prose(rng, tokens)}\n\nSummarise it."}])
            for i in range(n)]


def mixed_file(rng: random.Random, n: int) -> list[Line]:
    return [Line(f"line{i}", [{"role": "user", "content": f"Note {i}: {prose(rng, 40)}"}],
                 max_tokens=LONG_ANSWER if rng.random() < 0.2 else 16) for i in range(n)]


def write_batch(path: Path, lines: list[Line]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"{line.group}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": line.messages, "max_tokens": line.max_tokens, "temperature": 0}})
        + b"\n" for i, line in enumerate(lines)))
    return path


# -- clients: each gets the simulator's URL, returns when every line is answered ------------------------------

async def post(session: aiohttp.ClientSession, url: str, line: Line) -> None:
    body = {"model": MODEL, "messages": line.messages, "stream": False,
            "options": {"num_predict": line.max_tokens, "temperature": 0}}
    async with session.post(f"{url}/api/chat", data=orjson.dumps(body)) as r:
        if r.status != 200:
            raise SystemExit(f"the simulator answered {r.status}: {await r.text()}")
        await r.read()


async def workers(url: str, n: int, queue: Iterable[list[Line]]) -> list[float]:
    """``n`` workers pull work items from one queue; each sends an item's lines one after another. Returns when
    each line was answered."""
    items = iter(queue)
    done: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:

        async def worker() -> None:
            for item in items:
                for line in item:
                    await post(session, url, line)
                    done.append(time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(n)))
    return done


def by_group(lines: list[Line]) -> list[list[Line]]:
    groups: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        groups[line.group].append(line)
    return list(groups.values())


async def file_order(url: str, n: int, lines: list[Line], path: Path) -> list[float]:
    return await workers(url, n, ([line] for line in lines))


async def grouped(url: str, n: int, lines: list[Line], path: Path) -> list[float]:
    return await workers(url, n, ([line] for group in by_group(lines) for line in group))


async def affinity(url: str, n: int, lines: list[Line], path: Path) -> list[float]:
    return await workers(url, n, by_group(lines))


async def obatch_run(url: str, n: int | None, lines: list[Line], path: Path, work: Path, schedule: str = "auto",
                     cache: str = "auto") -> list[float]:
    """``obatch run`` of the file with its data in ``work`` (``n``: a fixed level, None: auto); when each line
    finished."""
    settings = Settings(backend="ollama", ollama_url=url, data_dir=work, schedule=schedule,
                        concurrency=n or "auto", cache=cache)
    report = await run_batch_file(path, settings=settings, progress=False, fresh=True)
    if report.batch.completed != len(lines):
        raise SystemExit(f"obatch: {report.batch.completed} of {len(lines)} lines completed")
    engine, sessions = await open_store(settings.db_url)
    try:
        return [row[0] async for row in repo.iter_values(sessions, report.batch.id, ["finished_at"])]
    finally:
        await engine.dispose()


def obatch_client(schedule: str, fixed: bool) -> Client:
    async def client(url: str, n: int, lines: list[Line], path: Path) -> list[float]:
        with tempfile.TemporaryDirectory() as work:
            return await obatch_run(url, n if fixed else None, lines, path, Path(work), schedule)

    return client


class Again:
    """``obatch again``: ``first`` runs untimed on a simulator of its own, then the client (timed, on a fresh
    simulator at the same port) runs the file again in the same data directory. ``obatch new host``
    (``same_host=False``): the timed simulator takes another port, a host the data directory has not seen."""

    def __init__(self, *, same_host: bool = True) -> None:
        self.work: Path | None = None
        self.same_host = same_host

    async def first(self, config: SimConfig, lines: list[Line], path: Path, work: Path) -> int:
        """The first run; returns the port its engine listened on where the timed run's engine takes it, else 0."""
        self.work = work
        url, stop = run_in_thread(config)
        try:
            await obatch_run(url, None, lines, path, work)
        finally:
            stop()
        return int(url.rsplit(":", 1)[1]) if self.same_host else 0

    async def __call__(self, url: str, n: int, lines: list[Line], path: Path) -> list[float]:
        assert self.work is not None, "the first run comes first"
        return await obatch_run(url, None, lines, path, self.work, cache="off")


Client = Callable[[str, int, list[Line], Path], Awaitable[list[float]]]
CLIENTS: dict[str, Client] = {
    "file order": file_order, "grouped": grouped, "affinity": affinity,
    "obatch": obatch_client("auto", fixed=False), "obatch again": Again(), "obatch new host": Again(same_host=False),
    "obatch file": obatch_client("file", fixed=False),
    "obatch c=N": obatch_client("auto", fixed=True), "obatch c=N file": obatch_client("file", fixed=True)}


def tail(done: list[float]) -> float:
    """Seconds from 95% of the lines answered to the last."""
    done = sorted(done)
    return done[-1] - done[max(0, int(0.95 * len(done)) - 1)] if done else 0.0


async def measure(config: SimConfig, client: Client, lines: list[Line], path: Path) -> tuple[float, float, float]:
    """(wall seconds, share of prompt tokens the slots' caches held, tail seconds) of one client on a fresh
    simulator."""
    with tempfile.TemporaryDirectory() as work:
        port = await client.first(config, lines, path, Path(work)) if isinstance(client, Again) else 0
        sim = OllamaSim(config, port=port)
        url, stop = run_in_thread(sim=sim)
        try:
            started = time.perf_counter()
            done = await client(url, config.num_parallel, lines, path)
            wall = time.perf_counter() - started
        finally:
            stop()
    return wall, sim.stats.cached_prompt_tokens / max(sim.stats.prompt_tokens, 1), tail(done)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=1400, help="tokens of a document or shared system prompt")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--prompt-tps", type=float, default=40_000.0, help="prompt tokens/s of the model")
    parser.add_argument("--per-slot", action="store_true", help="--prompt-tps is each slot's, not shared")
    parser.add_argument("--decode-tps", type=float, default=200.0, help="generated tokens/s of one slot")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each client; the median wall time")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--files", default="documents,system,control,mixed", help="which files, comma-separated")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="which clients, comma-separated")
    args = parser.parse_args()
    clients = {name: CLIENTS[name] for name in args.clients.split(",")}
    config = SimConfig(models=(SimModel(MODEL),), num_parallel=args.slots, prompt_tps=args.prompt_tps,
                       prompt_tps_shared=not args.per_slot, decode_tps=args.decode_tps,
                       default_output_tokens=ANSWER_TOKENS, prompt_cache=True)
    rng = random.Random(args.seed)
    n = args.documents * args.questions
    made = {"documents": lambda: documents_file(rng, args.documents, args.questions, args.tokens),
            "system": lambda: system_file(rng, n, args.tokens), "control": lambda: control_file(rng, n, args.tokens),
            "mixed": lambda: mixed_file(rng, n)}
    files = {name: made[name]() for name in args.files.split(",")}
    print(f"simulator: {args.slots} slots, prompt {args.prompt_tps:,.0f} tok/s "
          f"{'per slot' if args.per_slot else 'shared'}, decode "
          f"{args.decode_tps:,.0f} tok/s per slot, prompt cache on; {n} lines a file, answers of {ANSWER_TOKENS} "
          f"tokens; {args.slots} in flight\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        warm = files[next(iter(files))][:1]
        await measure(config, CLIENTS["obatch"], warm, write_batch(Path(tmp) / "warm.jsonl", warm))
        print(f"{'file':<10} {'client':<16} {'wall s':>7} {'cached':>7} {'x file order':>13} {'of affinity':>12} "
              f"{'tail s':>7}", flush=True)
        for name, lines in files.items():
            path = write_batch(Path(tmp) / f"{name}.jsonl", lines)
            run_config = replace(config, default_output_tokens=LONG_ANSWER) if name == "mixed" else config
            rows: dict[str, tuple[float, float, float]] = {}
            for label, client in clients.items():
                runs = [await measure(run_config, client, lines, path) for _ in range(args.repeats)]
                rows[label] = (statistics.median(r[0] for r in runs), statistics.fmean(r[1] for r in runs),
                               statistics.median(r[2] for r in runs))
            for label, (wall, cached, end) in rows.items():
                base = f"{rows['file order'][0] / wall:12.2f}x" if "file order" in rows else f"{'':>13}"
                best = f"{rows['affinity'][0] / wall:12.2f}" if "affinity" in rows else f"{'':>12}"
                print(f"{name:<10} {label:<16} {wall:7.2f} {cached:7.1%} {base} {best} {end:7.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
