"""Does the estimate come true? Sweep a model, estimate a held-out batch file, run it, print estimate vs actual.

    python perf/estimate_accuracy.py                       # the embedded engine (SmolLM2-135M), ~2-3 minutes
    python perf/estimate_accuracy.py --backend sim         # the Ollama simulator, seconds
    python perf/estimate_accuracy.py --requests 64 --concurrency 4 --data-dir /tmp/acc

Steps: (1) a small sweep (num_ctx 2048 × concurrency 1, 2, 4) on the built-in ``chat`` workload (generated
prompts, forced output lengths); (2) a held-out batch file of natural requests (instructions with context passages
of varied length, several max_tokens, no forced lengths), never seen before; (3) its estimate, through the same
function ``GET /v1/benchmarks/estimate?input_file_id=`` answers with; (4) the batch run as ``obatch run`` runs it
(which also stores its own estimate at start); (5) estimate vs actual and the error. Steps 2-5 repeat with a new
file per run (``--runs``); later estimates may learn from earlier batches how much of max_tokens answers use.

Natural files (``--cases uncapped,mixed``): requests without max_tokens, or a mix of caps, each kind on a copy of the
swept store so the first file knows nothing of the model's answer lengths: it is estimated blind, then after a pilot
of ``--pilot`` lines (``auto``: obatch's automatic pilot; the batch takes those lines as finished), and the next
files from the finished batches' answers. Each estimate is also compared with the duration model alone: the model
replayed on the lines as they ran, at the answer lengths they had.
SmolLM2-135M runs a share of its uncapped answers on to the context window (about two minutes each at num_ctx
2048 on two cores), so on the embedded engine measure at a small context:

    python perf/estimate_accuracy.py --num-ctx 512 --workload prompt=16-160,output=32-320 --runs 0 --cases "" \
        --data-dir /tmp/swept                                          # the sweep, once (~10 minutes)
    python perf/estimate_accuracy.py --num-ctx 512 --swept /tmp/swept --runs 0 --cases uncapped \
        --questions short --requests 200 --pilot auto                  # then each case on a copy of it

``--num-ctx`` sets the sweep's context window and the held-out batches' (and pilots'): obatch never picks less
than 2,048 on its own, so the engine is presented to them as a model of that context length. The sweep's workload
must then fit it (prompt + output below ``--num-ctx``).

Blind estimates (``--blind-answers 4,16,64,256``, simulator only): held-out files estimated with nothing known of
the answers, each on a fresh copy of the swept store, while the simulator answers about that many words; the share
of intervals that hold the actual. ``--pilot-from-zero uncapped,mixed``: files estimated by a pilot on an empty
store (no benchmark, no history). ``--slow-after-sweep 0.5`` (simulator): the engine runs at half the speed it was
swept at, as a shared machine's engine drifts; a pilot measures today's speed.

Don't run it while other heavy processes share the CPU: the engine's speed (and so the measurement) follows them.
The script measures how much CPU other processes took during each held-out run and leaves out (but prints) the
runs they disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from obatch import bench
from obatch.api import run_batch_file
from obatch.backends.base import Backend, BackendWrapper, ModelInfo, Result
from obatch.bench.estimate.request import EstimateRequest, estimate_groups
from obatch.bench.pilot_run import file_sha256, pilot_size
from obatch.bench.service import combined, piloted
from obatch.config import Settings
from obatch.context import MIN_NUM_CTX
from obatch.protocol import DurationEstimate
from obatch.store import pilots
from obatch.store.db import open_store

MODEL_LOCAL = "smollm2:135m"
TOPICS = ("rivers", "the moon", "bread", "trains", "volcanoes", "bees", "music", "glass", "owls", "clouds", "salt",
          "maps", "chess", "tea", "snow", "copper", "bridges", "lighthouses", "paper", "wind", "coral", "clocks")
ASKS = ("Write a short paragraph about {t}.", "Explain how {t} work, in a few sentences.",
        "Describe {t} to a child.", "List some facts about {t} and explain each one.",
        "Write a short story that involves {t}.")
SHORT_ASKS = ("Name a colour.", "What is 2+3?", "What is the capital of France?", "Name an animal that lives in "
              "the sea.", "Say hello in Spanish.", "What is 7 times 6?", "Which planet is closest to the sun?",
              "Name a yellow fruit.", "How many legs does a spider have?", "What colour is the sky on a clear day?",
              "Name a musical instrument.", "What is the opposite of hot?")
PASSAGE = ("The survey team walked along the valley at dawn and recorded what they saw. The water was cold and "
           "clear, the stones were smooth, and the old bridge still carried carts to the market twice a week. "
           "Nobody in the village remembered when the bridge was built, but the records in the library said that "
           "the first stones were laid after a flood destroyed the wooden crossing. ")


class ForeignCpu:
    """The share of the machine's CPU that processes other than this one and its children (the engine) used
    since ``start``: a run the rest of the machine competed with does not measure the estimate (Linux only)."""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own() -> float:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                rest = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(stat.parent.name)
            parents[pid] = int(rest[1])
            ticks[pid] = sum(int(v) for v in rest[11:15])  # its own time and that of its children it waited for
        mine, total = {os.getpid()}, 0
        for pid in sorted(parents):  # children have larger pids than their parents here
            if pid in mine or parents[pid] in mine:
                mine.add(pid)
                total += ticks[pid]
        return total / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    def share(self) -> float:
        wall = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        return max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / wall if wall > 0 else 0.0


class Windowed(BackendWrapper):
    """The engine as if the model's context were ``window`` tokens: obatch then runs the batch (and its pilot) at
    that num_ctx (it never picks less than 2,048 on its own), so an answer that runs on to the context costs
    seconds, not minutes."""

    def __init__(self, inner: Backend, window: int) -> None:
        super().__init__(inner)
        self.window = window

    def _narrow(self, info: ModelInfo) -> ModelInfo:
        return dataclasses.replace(info, context_length=min(info.context_length or self.window, self.window))

    async def models(self) -> list[ModelInfo]:
        return [self._narrow(info) for info in await self.inner.models()]

    async def show(self, model: str) -> ModelInfo:
        return self._narrow(await self.inner.show(model))

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        return await self.inner.complete(url, body, num_ctx=num_ctx, stream=stream)

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        return self.inner.stream_chat(body, num_ctx=num_ctx)


CAPS = {"capped": (48, 64, 96, 128, 160), "uncapped": (None,), "mixed": (None, None, 32, 64, 128, 256)}


def held_out_file(path: Path, model: str, n: int, seed: int, kind: str = "capped", questions: str = "long",
                  passages: int = 4) -> Path:
    """Natural requests the sweep never saw: varied context passages, instructions and max_tokens (``capped``),
    none (``uncapped``: the model stops where it likes) or some of each (``mixed``). ``questions="short"`` asks
    questions a small model answers in a few words, ended at the first line break (so it stops by itself well
    inside its context); ``passages``: the most context passages a long one carries (each about 100 tokens)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if questions == "short":
            context, ask = "", rng.choice(SHORT_ASKS)
        else:
            context = PASSAGE * rng.randint(0, passages)
            ask = rng.choice(ASKS).format(t=rng.choice(TOPICS))
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"{context}{ask}".strip()}],
                                "temperature": 0}
        if questions == "short":
            body["stop"] = ["\n"]  # one line: SmolLM2-135M runs a quarter of such answers on to its context
        cap = rng.choice(CAPS[kind])
        if cap is not None:
            body["max_tokens"] = cap
        lines.append({"custom_id": f"held-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


async def file_estimate(settings: Settings, path: Path, concurrency: int | None, backend: Backend,
                        num_ctx: int) -> DurationEstimate:
    """The estimate ``GET /v1/benchmarks/estimate?input_file_id=`` gives for this file (pilot lines left out),
    for the num_ctx its batch runs with when that is below obatch's own pick (``Windowed``)."""
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            return combined(await estimate_groups(session, EstimateRequest(
                backend=backend.name, file=path, engine=backend, file_sha256=await asyncio.to_thread(file_sha256, path),
                concurrency=concurrency, num_ctx=num_ctx if num_ctx < MIN_NUM_CTX else None)))
    finally:
        await engine.dispose()


async def pilot_answers(settings: Settings, path: Path) -> tuple[int, int]:
    """(lines, completion tokens) a pilot ran of this file."""
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            rows = await pilots.all_of(session, await asyncio.to_thread(file_sha256, path))
        return len(rows), sum(r.completion_tokens or 0 for r in rows)
    finally:
        await engine.dispose()


async def replayed(settings: Settings, batch_id: str, model: str, backend: str, concurrency: int) -> float:
    """The duration model alone: its running time for the lines the batch ran, at the lengths they had (what the
    history of finished batches compares with their actual duration)."""
    from obatch.bench.estimate.calibrate import calibration_for
    from obatch.bench.estimate.fit import fits_for
    from obatch.bench.estimate.history import replayed_seconds
    from obatch.store import bench_repo

    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            fits = await fits_for(session, model, backend)
            calibration = await calibration_for(session, model, fits)
            count, rows = await bench_repo.run_lines(session, batch_id, model, 4000)
        seconds = replayed_seconds(fits, rows, count, calibration, num_ctx=None, concurrency=concurrency)
        return seconds if seconds is not None else float("nan")
    finally:
        await engine.dispose()


async def natural_case(args: argparse.Namespace, base: Path, kind: str, foreign: ForeignCpu,
                       sim_url: str | None) -> list[tuple[str, float, bool, bool]]:
    """Held-out files of one kind on a copy of the swept store, so the first knows nothing of answer lengths:
    the first estimated with nothing learnt, then after a pilot of ``--pilot`` lines (the batch takes those lines
    as finished; the estimate and the run cover the rest), the next ones from the finished batches' answers.
    Returns (label, error %, within interval, disturbed) per estimate."""
    data_dir = base.parent / f"{base.name}-{kind}"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(base, data_dir)
    settings = _settings(args, data_dir, sim_url)
    results = []
    backend = await open_windowed(settings, args.num_ctx)
    try:
        for attempt in range(args.natural_runs):
            held = held_out_file(data_dir / f"{kind}_{attempt}.jsonl", args.model, args.requests,
                                 seed=args.seed + 100 * (attempt + 1) + len(kind), kind=kind,
                                 questions=args.questions, passages=args.passages)
            blind = await file_estimate(settings, held, args.concurrency, backend, args.num_ctx)
            guesses = [("nothing learnt", blind)]
            if attempt == 0:
                engine, sessions = await open_store(settings.db_url)
                try:
                    async with sessions() as session:
                        made = await piloted(session, sessions, settings, backend, held, args.pilot,
                                             backend=backend.name, concurrency=args.concurrency,
                                             num_ctx=args.num_ctx if args.num_ctx < MIN_NUM_CTX else None)
                finally:
                    await engine.dispose()
                assert made.pilot is not None  # the estimate the pilot made is the file's from then on
                guesses = [("nothing learnt", blind), (f"pilot {args.pilot} ({made.pilot.requests} lines)", made)]
            else:
                guesses = [("history", blind)]
            foreign.start()
            run = await run_batch_file(held, settings=settings, backend=backend, concurrency=args.concurrency,
                                       progress=False, fresh=True)
            actual, others = run.batch.run_seconds, foreign.share()
            disturbed = others > args.max_foreign
            piloted_lines = await pilot_answers(settings, held) if attempt == 0 else (0, 0)
            model_alone = await replayed(settings, run.batch.id, args.model, backend.name, args.concurrency)
            for label, guess in guesses:
                if label == "nothing learnt" and attempt == 0 and len(guesses) > 1:
                    # the run covers the lines the pilot left; scale the blind estimate of all lines to them
                    share = (guess.num_requests - piloted_lines[0]) / guess.num_requests
                    seconds, low, high = guess.seconds * share, guess.low * share, guess.high * share
                else:
                    seconds, low, high = guess.seconds, guess.low, guess.high
                error = (seconds - actual) / actual * 100
                within = low <= actual <= high
                results.append((f"{kind} #{attempt + 1} {label}", error, within, disturbed))
                answers = guess.answers
                # the lines a pilot ran are the batch's too, but not the run's
                ran = (run.batch.output_tokens - piloted_lines[1]) / max(run.batch.completed - piloted_lines[0], 1)
                own = (model_alone + (guess.load_seconds or 0.0) - actual) / actual * 100
                print(f"  {kind} file {attempt + 1} ({label}): estimate {seconds:.1f} s [{low:.1f}, {high:.1f}], "
                      f"actual {actual:.1f} s, error {error:+.1f}% ({'in' if within else 'OUT of'} interval); "
                      f"answers from {answers.source if answers else '-'}"
                      f"{f' (mean {answers.mean:.0f} tokens)' if answers and answers.mean else ''}, "
                      f"{guess.output_tokens_mean or 0:.0f} output tokens per line expected, history "
                      f"×{guess.history_factor:.2f}; run: "
                      f"{ran:.0f} output tokens per line; the duration model alone (replayed on the lines as they ran) "
                      f"erred {own:+.1f}%{', DISTURBED' if disturbed else ''}")
    finally:
        await backend.aclose()
    return results


async def blind_case(args: argparse.Namespace, base: Path, sim: Any, answer: int, kind: str) -> tuple[str, bool]:
    """A held-out file of ``kind`` estimated blind (nothing known of the model's answers: a fresh copy of the swept
    store) while the simulator answers about ``answer`` words, then run: does the interval hold the actual?"""
    data_dir = base.parent / f"{base.name}-blind-{kind}-{answer}"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(base, data_dir)
    sim.config.default_output_tokens = answer
    settings = _settings(args, data_dir, sim.url)
    backend = await open_windowed(settings, args.num_ctx)
    try:
        held = held_out_file(data_dir / f"blind_{kind}.jsonl", args.model, args.requests, seed=args.seed + answer,
                             kind=kind, questions=args.questions, passages=args.passages)
        made = await file_estimate(settings, held, args.concurrency, backend, args.num_ctx)
        run = await run_batch_file(held, settings=settings, backend=backend, concurrency=args.concurrency,
                                   progress=False, fresh=True)
    finally:
        await backend.aclose()
    actual = run.batch.run_seconds
    within = made.low <= actual <= made.high
    label = f"{kind}, answers ~{answer} words"
    print(f"  blind {label}: estimate {made.seconds:.1f} s [{made.low:.1f}, {made.high:.1f}]"
          f"{' (a guess)' if getattr(made, 'guess', False) else ''}, actual {actual:.1f} s "
          f"({run.batch.output_tokens / max(run.batch.completed, 1):.0f} output tokens per line), error "
          f"{(made.seconds - actual) / actual * 100:+.1f}% ({'in' if within else 'OUT of'} interval)")
    return label, within


async def zero_case(args: argparse.Namespace, base: Path, kind: str, sim_url: str | None) -> tuple[str, float]:
    """A pilot from zero: no benchmark and no history of the model (an empty store), a held-out file of ``kind``,
    its pilot (``--pilot``), the estimate of the rest from the pilot's own latencies, then the batch."""
    data_dir = base.parent / f"{base.name}-zero-{kind}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = _settings(args, data_dir, sim_url)
    backend = await open_windowed(settings, args.num_ctx)
    try:
        held = held_out_file(data_dir / f"zero_{kind}.jsonl", args.model, args.requests, seed=args.seed + 7,
                             kind=kind, questions=args.questions, passages=args.passages)
        engine, sessions = await open_store(settings.db_url)
        try:
            async with sessions() as session:
                made = await piloted(session, sessions, settings, backend, held, args.pilot, backend=backend.name,
                                     concurrency=args.concurrency,
                                     num_ctx=args.num_ctx if args.num_ctx < MIN_NUM_CTX else None)
        finally:
            await engine.dispose()
        run = await run_batch_file(held, settings=settings, backend=backend, concurrency=args.concurrency,
                                   progress=False, fresh=True)
    finally:
        await backend.aclose()
    actual = run.batch.run_seconds
    error = (made.seconds - actual) / actual * 100
    lines = made.pilot.requests if made.pilot else 0
    print(f"  pilot from zero, {kind} ({lines} pilot lines): estimate {made.seconds:.1f} s [{made.low:.1f}, "
          f"{made.high:.1f}], actual {actual:.1f} s, error {error:+.1f}% "
          f"({'in' if made.low <= actual <= made.high else 'OUT of'} interval)")
    return kind, error


async def auto_case(args: argparse.Namespace, settings: Settings, attempt: int, backend: Backend) -> float:
    """A held-out capped file estimated under auto concurrency (the level auto is expected to settle on) and run
    under auto: the error, and the level auto settled on against the estimate's."""
    held = held_out_file(settings.data_dir / f"auto_{attempt}.jsonl", args.model, args.requests,
                         seed=args.seed + 50 + attempt, questions=args.questions, passages=args.passages)
    made = await file_estimate(settings, held, None, backend, args.num_ctx)
    run = await run_batch_file(held, settings=settings, backend=backend, concurrency="auto", progress=False,
                               fresh=True)
    hosts = orjson.loads(run.batch.concurrency_json or "{}").get("hosts") or [{}]
    levels = [c["level"] for c in hosts[0].get("history") or []]
    actual = run.batch.run_seconds
    error = (made.seconds - actual) / actual * 100
    print(f"  auto run {attempt + 1}: estimate {made.seconds:.1f} s [{made.low:.1f}, {made.high:.1f}] at "
          f"concurrency {made.concurrency}; auto went {' → '.join(map(str, levels))} and settled at "
          f"{hosts[0].get('best')}; actual {actual:.1f} s, error {error:+.1f}% "
          f"({'in' if made.low <= actual <= made.high else 'OUT of'} interval)")
    return error


async def open_windowed(settings: Settings, num_ctx: int) -> Backend:
    """The backend, presented as a model of ``num_ctx`` tokens of context when that is below obatch's own pick."""
    from obatch.backends import open_backend

    backend = await open_backend(settings)
    return Windowed(backend, num_ctx) if num_ctx < MIN_NUM_CTX else backend


def _settings(args: argparse.Namespace, data_dir: Path, sim_url: str | None) -> Settings:
    backend = "ollama" if args.backend == "sim" else args.backend
    return Settings(_env_file=None, data_dir=data_dir, backend=backend,
                    ollama_url=sim_url or Settings().ollama_url, local_threads=args.threads)


async def measure(args: argparse.Namespace) -> float:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="obatch-acc-"))
    backend = "ollama" if args.backend == "sim" else args.backend
    sim = None
    if args.backend == "sim":
        from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel

        sim = OllamaSim(SimConfig(models=(SimModel(args.model),), num_parallel=args.sim_parallel, prompt_tps=3000,
                                  decode_tps=300, default_output_tokens=args.sim_answer, load_seconds=0.2))
        await sim.start()
    settings = Settings(_env_file=None, data_dir=data_dir, backend=backend,
                        ollama_url=sim.url if sim else Settings().ollama_url, local_threads=args.threads)
    windowed: Backend | None = None
    try:
        print(f"load average at start: {os.getloadavg()[0]:.2f} (the engine shares {os.cpu_count()} cores with it)")
        started, foreign = time.monotonic(), ForeignCpu()
        if args.swept:  # a store swept before (its disturbed points marked excluded): the sweep is not run again
            shutil.rmtree(data_dir, ignore_errors=True)
            shutil.copytree(args.swept, data_dir)
            frames = await bench.load_report(settings=settings)
            print(f"sweep reused from {args.swept}: {frames.points.height} points")
        else:
            spec = bench.SweepSpec(models=[args.model], num_ctx=[args.num_ctx], concurrency=args.sweep_concurrency,
                                   requests=args.sweep_requests, repeats=args.sweep_repeats, workload=args.workload,
                                   seed=1)
            report = await bench.run_sweep(spec, settings=settings, progress=False)
            print(f"sweep {report.run_id}: {len(report.measured)} points in {time.monotonic() - started:.1f} s "
                  f"(other processes used {foreign.share():.0%} of the CPU meanwhile)")
            frames = await bench.load_report(settings=settings, run_id=report.run_id)
        for row in frames.summary.iter_rows(named=True):
            print(f"  c={row['concurrency']}: {row['req_per_s']:.2f} req/s (±{row['req_per_s_std'] or 0:.2f} over "
                  f"{row['repeats']} repeats), {row['output_tps']:.0f} output tok/s, engine gen {row['gen_tps']:.0f} "
                  f"tok/s per request, p50 {row['latency_p50']:.0f} ms")
        if args.slow_after_sweep != 1.0 and sim is not None:  # the engine's speed moves after it was swept
            sim.config = dataclasses.replace(sim.config, decode_tps=sim.config.decode_tps * args.slow_after_sweep,
                                             prompt_tps=sim.config.prompt_tps * args.slow_after_sweep)
            print(f"the simulator now runs at ×{args.slow_after_sweep} the speed it was swept at")
        if args.pilot_from_zero:
            print(f"pilots from zero ({args.requests} natural requests each, c={args.concurrency}, no benchmark):")
            zero = [await zero_case(args, data_dir, kind, sim.url if sim else None)
                    for kind in args.pilot_from_zero.split(",") if kind]
            print("RESULT pilot from zero: " + ", ".join(f"{kind} {e:+.1f}%" for kind, e in zero))
        blind = [(kind, int(answer)) for kind in args.blind_kinds.split(",") if kind
                 for answer in args.blind_answers.split(",") if answer] if sim is not None else []
        if blind:
            print(f"blind estimates ({args.requests} natural requests each, c={args.concurrency}):")
            holding = [await blind_case(args, data_dir, sim, answer, kind) for kind, answer in blind]
            print(f"RESULT blind: {sum(w for _, w in holding)} of {len(holding)} intervals hold the actual")
        if args.auto_runs:
            print(f"held-out capped files under auto concurrency ({args.requests} requests each):")
            engine_for_auto = await open_windowed(settings, args.num_ctx)
            try:
                autos = [await auto_case(args, settings, attempt, engine_for_auto) for attempt in range(args.auto_runs)]
            finally:
                await engine_for_auto.aclose()
            print("RESULT auto: " + ", ".join(f"{e:+.1f}%" for e in autos))
        natural: list[tuple[str, float, bool, bool]] = []
        for kind in [k for k in args.cases.split(",") if k]:
            print(f"held-out {kind} files ({args.requests} natural requests each, c={args.concurrency}):")
            natural += await natural_case(args, data_dir, kind, foreign, sim.url if sim else None)
        windowed = await open_windowed(settings, args.num_ctx)
        errors: list[float] = []
        disturbed: list[float] = []
        actuals: list[float] = []
        for attempt in range(args.runs):  # a new file each time: none was seen before its estimate was made
            held = held_out_file(data_dir / f"held_out_{attempt}.jsonl", args.model, args.requests,
                                 seed=args.seed + attempt, questions=args.questions,
                                 passages=args.passages)
            guess = await bench.estimate_workload(args.model, settings=settings, file=held,
                                                  concurrency=args.concurrency)
            foreign.start()
            run = await run_batch_file(held, settings=settings, backend=windowed, concurrency=args.concurrency,
                                       progress=False, fresh=True)
            actual, others = run.batch.run_seconds, foreign.share()
            actuals.append(actual)
            error = (guess.seconds - actual) / actual * 100
            (disturbed if others > args.max_foreign else errors).append(error)
            stored = orjson.loads(run.batch.estimate_json or "null")
            print(f"held-out run {attempt + 1}: {args.requests} requests at c={args.concurrency}: estimate "
                  f"{guess.seconds:.1f} s [{guess.low:.1f}, {guess.high:.1f}] (stored at start: "
                  f"{stored['seconds'] if stored else float('nan'):.1f} s), actual {actual:.1f} s, "
                  f"error {error:+.1f}%  ({run.batch.output_tokens} output tokens, mean prompt "
                  f"{run.batch.input_tokens / max(run.batch.completed, 1):.0f} tokens; estimated "
                  f"{guess.prompt_tokens_mean:.0f} prompt / {guess.output_tokens_mean:.0f} output per request; "
                  f"corrected ×{guess.history_factor:.2f} by {guess.history_batches} finished batch(es); "
                  f"other processes used {others:.0%} of the CPU{', DISTURBED' if others > args.max_foreign else ''})")
        if actuals:  # the machine's own repeatability: the first held-out file once more, estimated and all
            again_run = await run_batch_file(data_dir / "held_out_0.jsonl", settings=settings, backend=windowed,
                                             concurrency=args.concurrency, progress=False, fresh=True)
            print(f"repeatability: held-out file 1 run again took {again_run.batch.run_seconds:.1f} s, "
                  f"{actuals[0]:.1f} s the first time ({(again_run.batch.run_seconds / actuals[0] - 1) * 100:+.1f}%)")
        # the machine's own drift: measure the held-out runs' configuration again, as the sweep did
        again = None if not args.runs else await bench.run_sweep(
            bench.SweepSpec(models=[args.model], num_ctx=[args.num_ctx], concurrency=[args.concurrency],
                            requests=args.sweep_requests, workload=args.workload, seed=1),
            settings=settings, progress=False, fresh=True)
        before = frames.points.filter(frames.points["concurrency"] == args.concurrency)["wall_seconds"].to_list()
        after = [] if again is None else \
            (await bench.load_report(settings=settings, run_id=again.run_id)).points["wall_seconds"].to_list()
        if before and after:
            print(f"drift: the sweep's c={args.concurrency} point took {', '.join(f'{b:.1f}' for b in before)} s, "
                  f"the same point measured again after the batches {after[0]:.1f} s "
                  f"({(after[0] / (sum(before) / len(before)) - 1) * 100:+.1f}%): the machine's speed changed by "
                  "about that much meanwhile")
        engine, sessions = await open_store(settings.db_url)
        async with sessions() as session:
            record = await bench.estimates_vs_actuals(session)
        await engine.dispose()
        if record:  # the capped runs' batches (each natural case keeps its own store)
            print(f"estimate-vs-actual record: {len(record)} batches, "
                  f"{sum(r['within_interval'] for r in record)} within their interval")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
        if disturbed:
            print(f"left out: {len(disturbed)} run(s) that other processes competed with "
                  f"({', '.join(f'{e:+.1f}%' for e in disturbed)})")
        if natural:
            kept = [(label, e, w) for label, e, w, d in natural if not d and "nothing learnt" not in label]
            print("natural files, estimates from a pilot or history (undisturbed): " + ", ".join(
                f"{label} {e:+.1f}%{'' if w else ' (outside interval)'}" for label, e, w in kept))
            if kept:
                worst_natural = max((e for _, e, _ in kept), key=abs)
                print(f"RESULT natural: mean error {sum(e for _, e, _ in kept) / len(kept):+.1f}%, worst "
                      f"{worst_natural:+.1f}%, {sum(w for _, _, w in kept)} of {len(kept)} within their interval")
                errors.append(worst_natural)
        if not errors:
            print("RESULT: no undisturbed run; measure again on a quiet machine")
            return float("inf")
        worst = max(errors, key=abs)
        print(f"RESULT: mean error {sum(errors) / len(errors):+.1f}%, worst {worst:+.1f}% over {len(errors)} "
              f"undisturbed runs ({'within' if abs(worst) <= 15 else 'OUTSIDE'} ±15%)")
        return worst
    finally:
        if windowed is not None:
            await windowed.aclose()
        if sim is not None:
            await sim.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["local", "sim", "ollama", "openai"], default="local")
    p.add_argument("--model", default=MODEL_LOCAL)
    p.add_argument("--requests", type=int, default=48, help="held-out batch size")
    p.add_argument("--concurrency", type=int, default=4, help="the held-out batch's concurrency")
    p.add_argument("--sweep-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--sweep-requests", type=int, default=32)
    p.add_argument("--sweep-repeats", type=int, default=2, help="repeats of each sweep point (their spread widens "
                   "the interval; on a noisy machine they also steady the estimate)")
    p.add_argument("--workload", default="chat", help="the sweep's workload (a name or a spec such as "
                   "'prompt=16-160,output=32-320': at a small --num-ctx, prompt + output must fit it)")
    p.add_argument("--num-ctx", type=int, default=MIN_NUM_CTX, help="the context window of the sweep and of the "
                   "held-out batches (below 2,048 the engine is presented as a model of that context, so obatch "
                   "picks it)")
    p.add_argument("--runs", type=int, default=2, help="how many held-out capped batches to estimate and run")
    p.add_argument("--cases", default="uncapped,mixed",
                   help="natural held-out files to run besides the capped ones: uncapped, mixed (comma-separated)")
    p.add_argument("--natural-runs", type=int, default=3,
                   help="files per natural case: the first with a pilot, the next with the history of the others")
    p.add_argument("--pilot", type=pilot_size, default=16, help="lines the first natural file's pilot runs, or "
                   "auto (16, more while its answers leave the estimate unsure)")
    p.add_argument("--questions", choices=["long", "short"], default="long",
                   help="long: instructions over context passages; short: questions answered in a few words (a "
                        "small model then stops by itself)")
    p.add_argument("--passages", type=int, default=4, help="the most context passages of a long question (about "
                   "100 tokens each; at --num-ctx 512 use 2, or the longest prompts do not fit)")
    p.add_argument("--blind-answers", default="", help="simulator only: the typical natural answers (words, "
                   "comma-separated) at which held-out files are estimated blind, each on a fresh copy of the swept "
                   "store, and run (e.g. 4,16,64,256)")
    p.add_argument("--slow-after-sweep", type=float, default=1.0, help="simulator only: after the sweep, run the "
                   "engine at this share of its speed (0.5: half as fast), as a shared machine's engine drifts")
    p.add_argument("--pilot-from-zero", default="", help="file kinds (uncapped, mixed, capped) estimated by a "
                   "pilot on an empty store: no benchmark, no history")
    p.add_argument("--sim-parallel", type=int, default=2, help="the simulator's parallel slots")
    p.add_argument("--auto-runs", type=int, default=0, help="held-out capped files estimated and run under auto "
                   "concurrency")
    p.add_argument("--blind-kinds", default="uncapped,mixed", help="the file kinds of --blind-answers")
    p.add_argument("--sim-answer", type=int, default=128, help="the simulator's typical natural answer (words)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-foreign", type=float, default=0.10,
                   help="leave out runs during which other processes used more than this share of the CPU")
    p.add_argument("--data-dir")
    p.add_argument("--swept", help="a data dir swept before (by this script): copied, and its sweep not run again")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each result as soon as it is known
    worst = asyncio.run(measure(args))
    return 0 if abs(worst) <= 15 else 1


if __name__ == "__main__":
    sys.exit(main())
