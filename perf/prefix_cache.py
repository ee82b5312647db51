"""What does the order of a batch's lines cost when they share prompt prefixes? (what affinity scheduling must beat)

An Ollama simulator with a prompt cache per slot (``--prompt-cache``: a request takes the free slot whose last
prompt shares the longest prefix with its own, and only the rest of its prompt costs time) runs three files:
  documents   D documents of ~1,400 tokens x Q questions each, a short shared system prompt, shuffled
  system      one long shared system prompt (~1,400 tokens), a different short question on each line
  control     lines of the same length that share nothing but the chat template
each through four clients, on a fresh simulator every time (empty caches):
  file order  a bare aiohttp client, N requests in flight, in the file's order
  grouped     the same, each document's questions together
  affinity    N workers; each takes one document at a time and sends its questions one after another
  obatch run  ``obatch.run`` (the notebook API) with its default settings (auto concurrency)
N is the simulator's number of slots. Prompt processing dominates, as on a real engine: a miss costs ~1,400
tokens of prompt time, an answer 8 tokens of decode; the prompt rate is the model's, shared by the prompts in
progress at once (``--prompt-tps-shared``), the decode rate is each slot's. The simulator runs in this process (a
thread), so the cached prompt tokens are read from its counters. Wall times include everything a client does;
obatch's include its store (a new data directory per run) but not its imports (a one-line run warms it up).

    python perf/prefix_cache.py [--documents 8] [--questions 12] [--slots 8] [--prompt-tps 40000 [--per-slot]]
                                [--repeats 1]
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

import obatch
from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, count_tokens, run_in_thread

MODEL = "llama3.2:1b"
ANSWER_TOKENS = 8
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


def write_batch(path: Path, lines: list[Line]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"{line.group}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": line.messages, "max_tokens": ANSWER_TOKENS, "temperature": 0}}) + b"\n"
        for i, line in enumerate(lines)))
    return path


# -- clients: each gets the simulator's URL, returns when every line is answered ------------------------------

async def post(session: aiohttp.ClientSession, url: str, line: Line) -> None:
    body = {"model": MODEL, "messages": line.messages, "stream": False,
            "options": {"num_predict": ANSWER_TOKENS, "temperature": 0}}
    async with session.post(f"{url}/api/chat", data=orjson.dumps(body)) as r:
        if r.status != 200:
            raise SystemExit(f"the simulator answered {r.status}: {await r.text()}")
        await r.read()


async def workers(url: str, n: int, queue: Iterable[list[Line]]) -> None:
    """``n`` workers pull work items from one queue; each sends an item's lines one after another."""
    items = iter(queue)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:

        async def worker() -> None:
            for item in items:
                for line in item:
                    await post(session, url, line)

        await asyncio.gather(*(worker() for _ in range(n)))


def by_group(lines: list[Line]) -> list[list[Line]]:
    groups: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        groups[line.group].append(line)
    return list(groups.values())


async def file_order(url: str, n: int, lines: list[Line], path: Path) -> None:
    await workers(url, n, ([line] for line in lines))


async def grouped(url: str, n: int, lines: list[Line], path: Path) -> None:
    await workers(url, n, ([line] for group in by_group(lines) for line in group))


async def affinity(url: str, n: int, lines: list[Line], path: Path) -> None:
    await workers(url, n, by_group(lines))


async def obatch_run(url: str, n: int, lines: list[Line], path: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        settings = Settings(backend="ollama", ollama_url=url, data_dir=Path(work))
        frame = await obatch.run(path, settings=settings, progress=False, fresh=True)
    failed = frame.filter(frame["status"] != "succeeded")
    if len(frame) != len(lines) or len(failed):
        raise SystemExit(f"obatch run: {len(failed)} of {len(frame)} lines did not complete: {failed.head(3)}")


Client = Callable[[str, int, list[Line], Path], Awaitable[None]]
CLIENTS: dict[str, Client] = {"file order": file_order, "grouped": grouped, "affinity": affinity,
                              "obatch run": obatch_run}


async def measure(config: SimConfig, client: Client, lines: list[Line], path: Path) -> tuple[float, float]:
    """(wall seconds, share of prompt tokens the slots' caches held) of one client on a fresh simulator."""
    sim = OllamaSim(config)
    url, stop = run_in_thread(sim=sim)
    try:
        started = time.perf_counter()
        await client(url, config.num_parallel, lines, path)
        wall = time.perf_counter() - started
    finally:
        stop()
    return wall, sim.stats.cached_prompt_tokens / max(sim.stats.prompt_tokens, 1)


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
    args = parser.parse_args()
    config = SimConfig(models=(SimModel(MODEL),), num_parallel=args.slots, prompt_tps=args.prompt_tps,
                       prompt_tps_shared=not args.per_slot, decode_tps=args.decode_tps,
                       default_output_tokens=ANSWER_TOKENS, prompt_cache=True)
    rng = random.Random(args.seed)
    n = args.documents * args.questions
    files = {"documents": documents_file(rng, args.documents, args.questions, args.tokens),
             "system": system_file(rng, n, args.tokens), "control": control_file(rng, n, args.tokens)}
    print(f"simulator: {args.slots} slots, prompt {args.prompt_tps:,.0f} tok/s "
          f"{'per slot' if args.per_slot else 'shared'}, decode "
          f"{args.decode_tps:,.0f} tok/s per slot, prompt cache on; {n} lines a file, answers of {ANSWER_TOKENS} "
          f"tokens; {args.slots} in flight\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        await measure(config, obatch_run, files["control"][:1], write_batch(Path(tmp) / "warm.jsonl",
                                                                            files["control"][:1]))
        print(f"{'file':<10} {'client':<11} {'wall s':>7} {'cached':>7} {'x file order':>13} {'of affinity':>12}",
              flush=True)
        for name, lines in files.items():
            path = write_batch(Path(tmp) / f"{name}.jsonl", lines)
            rows: dict[str, tuple[float, float]] = {}
            for label, client in CLIENTS.items():
                runs = [await measure(config, client, lines, path) for _ in range(args.repeats)]
                rows[label] = statistics.median(r[0] for r in runs), statistics.fmean(r[1] for r in runs)
            for label, (wall, cached) in rows.items():
                print(f"{name:<10} {label:<11} {wall:7.2f} {cached:7.1%} {rows['file order'][0] / wall:12.2f}x "
                      f"{rows['affinity'][0] / wall:12.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
