"""Do estimates follow the schedule? Estimate vs actual for files that share prompt prefixes, run in obatch's order
(``--schedule auto``) and in the file's (``--schedule file``), on an Ollama simulator with a prompt cache per slot.

Steps: (1) a sweep of the simulator (num_ctx 4096 × concurrency 1, 2, N) on generated prompts of the files'
lengths, which share nothing (so the sweep itself sees no cache); (2) three files of perf/prefix_cache.py's kinds:
``documents`` (D documents of ~T tokens × Q questions, shuffled), ``system`` (one long shared system prompt, a short
question a line) and ``control`` (lines of the same length that share nothing); (3) each file estimated as
``obatch estimate`` and the estimate endpoint do, for each schedule, at concurrency N; (4) the file run by
``obatch run -c N --schedule S`` on a fresh simulator (empty caches); (5) estimate vs actual (the run's own
duration, the model's load left out of neither), the prompt tokens the estimate expected from the cache against
what the simulator's slots held (``--repeats``: the run of median duration).

    python perf/estimate_schedule.py [--slots 4] [--documents 6] [--questions 8] [--tokens 1000]
                                     [--prompt-tps 20000] [--decode-tps 200] [--files documents,system,control]
                                     [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

from prefix_cache import ANSWER_TOKENS, MODEL, control_file, documents_file, system_file, write_batch

from obatch.api import run_batch_file
from obatch.bench.estimate.request import EstimateRequest, estimate_groups
from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, run_in_thread


async def estimate(settings: Settings, path: Path, schedule: str, concurrency: int) -> tuple[float, float, float,
                                                                                                 float]:
    """(seconds, low, high, prompt tokens expected from the cache) of the file's estimate."""
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            made = (await estimate_groups(session, EstimateRequest(backend="ollama", file=path,
                                                                   concurrency=concurrency, schedule=schedule)))[0]
    finally:
        await engine.dispose()
    return made.seconds, made.low, made.high, made.cached_prompt_tokens or 0.0


async def run(config: SimConfig, settings: Settings, path: Path) -> tuple[float, int, int]:
    """(the running time of ``obatch run``, as the batch records it, prompt tokens the slots' caches held, all
    prompt tokens) on a fresh simulator. The run has a store of its own, so no file's run teaches the next one's
    estimate."""
    sim = OllamaSim(config)
    url, stop = run_in_thread(sim=sim)
    try:
        report = await run_batch_file(path, settings=settings.with_urls([url]), progress=False, fresh=True)
    finally:
        stop()
    return report.batch.run_seconds, sim.stats.cached_prompt_tokens, sim.stats.prompt_tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens of a document or shared system prompt")
    parser.add_argument("--prompt-tps", type=float, default=20_000.0, help="prompt tokens/s of the model (shared)")
    parser.add_argument("--decode-tps", type=float, default=200.0, help="generated tokens/s of one slot")
    parser.add_argument("--files", default="documents,system,control")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each file and schedule; the median")
    parser.add_argument("--seed", type=int, default=24)
    args = parser.parse_args()
    config = SimConfig(models=(SimModel(MODEL),), num_parallel=args.slots, prompt_tps=args.prompt_tps,
                       prompt_tps_shared=True, decode_tps=args.decode_tps, default_output_tokens=ANSWER_TOKENS,
                       prompt_cache=True)
    rng = random.Random(args.seed)
    n = args.documents * args.questions
    made = {"documents": lambda: documents_file(rng, args.documents, args.questions, args.tokens),
            "system": lambda: system_file(rng, n, args.tokens), "control": lambda: control_file(rng, n, args.tokens)}
    print(f"simulator: {args.slots} slots, prompt {args.prompt_tps:,.0f} tok/s shared, decode {args.decode_tps:,.0f} "
          f"tok/s per slot, prompt cache on; {n} lines a file, answers of {ANSWER_TOKENS} tokens; "
          f"concurrency {args.slots}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        swept = Settings(backend="ollama", data_dir=Path(tmp) / "swept", concurrency=args.slots)
        sim = OllamaSim(config)
        url, stop = run_in_thread(sim=sim)
        try:
            low, high = max(16, args.tokens // 2), args.tokens * 3 // 2
            spec = SweepSpec(models=[MODEL], num_ctx=[4096], concurrency=sorted({1, 2, args.slots}), requests=24,
                             workload=f"prompt={low}-{high},output={ANSWER_TOKENS}-{ANSWER_TOKENS}", seed=1)
            await run_sweep(spec, settings=swept.with_urls([url]), progress=False)
        finally:
            stop()
        print(f"{'file':<10} {'schedule':<9} {'estimate s':>10} {'interval':>15} {'actual s':>9} {'error':>7} "
              f"{'cached est.':>12} {'cached sim':>11}", flush=True)
        for name in args.files.split(","):
            path = write_batch(Path(tmp) / f"{name}.jsonl", made[name]())
            for schedule in ("auto", "file"):
                seconds, lo, hi, cached = await estimate(swept, path, schedule, args.slots)
                runs = sorted([await run(config, swept.model_copy(update={
                    "data_dir": Path(tmp) / f"{name}-{schedule}-{r}", "schedule": schedule}), path)
                    for r in range(args.repeats)])
                wall, held, prompts = runs[len(runs) // 2]
                print(f"{name:<10} {schedule:<9} {seconds:10.2f} [{lo:6.2f}, {hi:6.2f}] {wall:9.2f} "
                      f"{(seconds / wall - 1) * 100:+6.1f}% {cached / prompts:12.1%} {held / prompts:11.1%}",
                      flush=True)


if __name__ == "__main__":
    asyncio.run(main())
