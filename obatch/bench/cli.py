"""``obatch bench``, ``obatch sweep`` and ``obatch estimate``: the benchmark commands (registered by
``obatch.cli``). Handlers are async and return an exit status; ``obatch.cli.main`` runs them."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from obatch import errors
from obatch._extras import require
from obatch.config import Settings

BACKENDS = ["auto", "ollama", "openai", "local", "sim"]
SWEEP_NOTEBOOK = Path("notebooks") / "sweep.ipynb"
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated requests per second, got {text!r}") from exc
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates are positive numbers per second, got {text!r}")
    return rates


def _levels(args: argparse.Namespace) -> list[int]:
    """The concurrency levels to measure: as given; by default 1,2,4, or none when only rates are asked for."""
    if args.concurrency is not None:
        return list(args.concurrency)
    return [] if args.rate else [1, 2, 4]


def _settings(args: argparse.Namespace) -> Settings:
    from obatch.bench.frames import store_settings

    return store_settings(getattr(args, "data_dir", None))


def _backend(args: argparse.Namespace) -> str | None:
    return None if args.backend in (None, "auto") else str(args.backend)


async def _on_server(args: argparse.Namespace) -> int:
    """``obatch bench --server URL``: the server runs the sweep on its backend; print progress and its points.
    Interrupted (Ctrl-C), it asks the server to cancel the sweep (the points measured so far are kept)."""
    from pydantic import ValidationError

    from obatch.bench.schemas import SweepParams
    from obatch.client import Client, ClientError

    try:
        params = SweepParams(models=args.model, num_ctx=args.num_ctx, concurrency=_levels(args),
                             rates=args.rate or [], arrival=args.arrival, max_concurrency=args.max_concurrency,
                             requests=args.requests, workload=args.workload, repeats=args.repeats,
                             name=args.name or "")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise errors.ConfigError(f"This sweep cannot run on a server: {problems}") from None
    with Client(args.server, api_key=args.api_key or None) as api:
        try:
            sweep = await asyncio.to_thread(api.start_sweep, params)
            shown = -1
            try:
                while True:
                    if sweep.points_done != shown and not args.quiet:
                        shown = sweep.points_done
                        print(f"{sweep.id}: {sweep.points_done} of {sweep.points_total} point(s) · {sweep.status}"
                              + (f" · {sweep.current}" if sweep.current else ""), flush=True)
                    if not sweep.active:
                        break
                    await asyncio.sleep(1.0)
                    sweep = await asyncio.to_thread(api.get_sweep, sweep.id)
            except (asyncio.CancelledError, KeyboardInterrupt):
                api.cancel_sweep(sweep.id)
                print(f"{sweep.id}: cancelled; the points measured so far are kept", file=sys.stderr)
                raise
            if sweep.status != "completed":
                print(f"{sweep.id} {sweep.status}" + (f": {sweep.error}" if sweep.error else ""), file=sys.stderr)
                return 1
            points = [p for m in params.models for p in await asyncio.to_thread(api.benchmark_history, m)
                      if p.run_id == sweep.run_id]
            best = {b.model: b for b in await asyncio.to_thread(api.benchmark_models)}
        except ClientError as exc:
            raise errors.ObatchError(str(exc)) from None
    print(f"run {sweep.run_id} on the server's {sweep.backend}: {sweep.points_done} points")
    print(f"{'model':24} {'num_ctx':>7} {'load':>20} {'req/s':>8} {'out tok/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'ttft p50':>8} {'ok':>6}")
    for p in points:
        print(f"{p.model:24} {p.num_ctx:>7} {_load(p.concurrency, p.rate, p.arrival, p.achieved_rate):>20} "
              f"{p.req_per_s:>8.2f} {p.output_tps:>9.1f} {p.latency_p50 or 0:>8.0f} {p.latency_p99 or 0:>8.0f} "
              f"{p.ttft_p50 or 0:>8.0f} {p.success_rate:>6.1%}")
    for model in params.models:
        if model in best:
            print(f"{model}: best configuration num_ctx {best[model].num_ctx}, concurrency {best[model].concurrency}")
    if args.slo:
        with Client(args.server, api_key=args.api_key or None) as api:
            try:
                found = [c for m in params.models for c in await asyncio.to_thread(api.capacity, m, args.slo)]
            except ClientError as exc:
                raise errors.ObatchError(str(exc)) from None
        _print_capacity(found)
    return 0


def _load(concurrency: int, rate: float | None, arrival: str | None, achieved: float | None) -> str:
    """``c=4``, or ``4/s→3.9 poisson`` (offered → achieved rate) for a rate point."""
    if rate is None:
        return f"c={concurrency}"
    sent = f"→{achieved:.1f}" if achieved is not None else ""
    return f"{rate:g}/s{sent} {arrival or ''}".rstrip() + (f" ≤{concurrency}" if concurrency else "")


def _print_capacity(found: list[Any]) -> None:
    for c in found:
        bounds = ", ".join(f"{k} ≤ {v:g} ms" for k, v in c.slo.items())
        if c.load == "rate":
            levels = "  ".join(f"{lv['rate']:g}/s: {lv['goodput'] or 0:.2f} req/s good ({(lv['slo_share'] or 0):.0%})"
                               for lv in c.levels)
            if c.rate is None:
                print(f"{c.model} num_ctx {c.num_ctx}: no offered rate meets {bounds} for {c.min_share:.0%} of "
                      f"requests   [{levels}]")
            else:
                print(f"{c.model} num_ctx {c.num_ctx}: capacity at {bounds}: {c.rate:g} req/s offered ({c.arrival}),"
                      f" goodput {c.goodput:.2f} req/s   [{levels}]")
            continue
        levels = "  ".join(f"c={lv['concurrency']}: {lv['goodput'] or 0:.2f} req/s good "
                           f"({(lv['slo_share'] or 0):.0%})" for lv in c.levels)
        if c.concurrency is None:
            print(f"{c.model} num_ctx {c.num_ctx}: no measured concurrency meets {bounds} for "
                  f"{c.min_share:.0%} of requests   [{levels}]")
        else:
            print(f"{c.model} num_ctx {c.num_ctx}: capacity at {bounds}: concurrency {c.concurrency}, goodput "
                  f"{c.goodput:.2f} req/s   [{levels}]")


async def bench(args: argparse.Namespace) -> int:
    """Measure models × num_ctx × concurrency; print one line per configuration and where it saturates."""
    from obatch.bench.measure import SweepSpec, run_sweep

    if args.slo:
        from obatch.bench.slo import parse_slo

        parse_slo(args.slo)  # a mistyped SLO stops before anything is measured
    if args.server:
        return await _on_server(args)
    from obatch.bench.frames import load_report

    spec = SweepSpec(models=args.model, num_ctx=args.num_ctx, concurrency=_levels(args), requests=args.requests,
                     workload=args.workload, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                     max_failure_rate=args.max_failure_rate, backend=_backend(args), url=args.url,
                     name=args.name or "", rates=args.rate or [], arrival=args.arrival,
                     max_concurrency=args.max_concurrency)
    settings = _settings(args)
    report = await run_sweep(spec, settings=settings, progress=not args.quiet, fresh=args.fresh,
                             params={k: v for k, v in vars(args).items() if k != "handler"})
    frames = await load_report(settings=settings, run_id=report.run_id)
    print(f"run {report.run_id}: {len(report.measured)} points measured, {len(report.skipped)} already stored, "
          f"{report.seconds:.1f} s")
    print(f"{'model':24} {'num_ctx':>7} {'load':>20} {'req/s':>8} {'±':>6} {'out tok/s':>9} {'gen tok/s':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'ttft p50':>8} {'ok':>6}")
    for row in frames.summary.iter_rows(named=True):
        load = _load(row["concurrency"], row["rate"], row["arrival"], row["achieved_rate"])
        print(f"{row['model']:24} {row['num_ctx']:>7} {load:>20} {row['req_per_s']:>8.2f} "
              f"{_num(row['req_per_s_std'], 6, 2)} {row['output_tps']:>9.1f} {row['gen_tps'] or 0:>9.1f} "
              f"{row['latency_p50'] or 0:>8.0f} {row['latency_p99'] or 0:>8.0f} {row['ttft_p50'] or 0:>8.0f} "
              f"{row['success_rate']:>6.1%}")
    excluded = frames.points.filter(frames.points["excluded"])
    if len(excluded):
        print(f"{len(excluded)} point(s) exceeded the failure threshold and are not averaged in")
    for row in frames.saturation.iter_rows(named=True):
        growth = "still growing at" if row["still_growing"] else "saturates at"
        print(f"{row['model']} num_ctx {row['num_ctx']}: throughput {growth} concurrency {row['saturates_at']}")
    if args.slo:
        _print_capacity(await _local_capacity(settings, report.run_id, args.slo))
    return 0


async def _local_capacity(settings: Settings, run_id: str, slo: str) -> list[Any]:
    from obatch.bench import frames
    from obatch.bench.slo import capacities, parse_slo, with_goodput
    from obatch.store.db import open_store

    bounds = parse_slo(slo)
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            return capacities(await with_goodput(session, await frames.points(session, run_id=run_id), bounds), bounds)
    finally:
        await engine.dispose()


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"parameters look like key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], *, cwd: Path | None = None) -> Path:
    """Execute a notebook with papermill, in a child process (blocking: call it from a thread). The executed copy
    keeps every output, and papermill records the injected parameters in its metadata. A failing cell raises
    ``ObatchError`` with papermill's account of it; the executed copy still shows where it stopped."""
    require("notebooks", "papermill", "ipykernel")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "papermill", str(notebook), str(output), "-y", json.dumps(parameters),
               "--cwd", str(cwd or Path.cwd()), "--no-progress-bar"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise errors.ObatchError(f"{notebook} failed (executed copy: {output}):\n{tail}")
    return output


def sweep_output_path(data_dir: Path, name: str, now: dt.datetime | None = None) -> Path:
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return data_dir / "runs" / f"{stamp}-{_NAME.sub('-', name).strip('-') or 'sweep'}.ipynb"


async def sweep(args: argparse.Namespace) -> int:
    """Run notebooks/sweep.ipynb with papermill into data/runs/<timestamp>-<name>.ipynb."""
    require("notebooks", "papermill", "ipykernel")
    settings = _settings(args)
    notebook = Path(args.notebook) if args.notebook else SWEEP_NOTEBOOK
    if not notebook.is_file():
        raise errors.ConfigError(f"No sweep notebook at {notebook} (run from the project root, or pass --notebook).")
    data_dir = settings.data_dir.resolve()
    output = sweep_output_path(data_dir, args.name)
    parameters = dict(args.param) | {"name": args.name, "data_dir": str(data_dir), "output_notebook": str(output)}
    print(f"executing {notebook} → {output}")
    await asyncio.to_thread(run_notebook, notebook, output, parameters)
    print(f"done: {output}")
    return 0


async def estimate(args: argparse.Namespace) -> int:
    """Print an estimate (or, with --history, the estimate-vs-actual record of finished batches). ``--pilot N``
    runs N random lines of the file first (``obatch run`` of that file then takes them as finished)."""
    if args.history:
        from obatch.bench.estimate.history import estimates_vs_actuals
        from obatch.store.db import open_store

        engine, sessions = await open_store(_settings(args).db_url)
        try:
            async with sessions() as session:
                for row in await estimates_vs_actuals(session):
                    print(f"{row['batch_id']}  {row['models']:20} n={row['requests']:<6} c={row['concurrency']}  "
                          f"estimate {row['estimated_seconds']:8.1f} s  actual {row['actual_seconds']:8.1f} s  "
                          f"error {row['error_pct'] or 0:+6.1f}%  {'in' if row['within_interval'] else 'OUT of'} "
                          "interval")
        finally:
            await engine.dispose()
        return 0
    made = await estimate_answer(args)
    if args.completion_window:
        from obatch.batches import window_seconds
        from obatch.bench.estimate.deadline import plan

        seconds = window_seconds(args.completion_window, minimum=_settings(args).min_completion_window)
        made = made.model_copy(update={"deadline": plan(made, seconds)})
    for line in describe(made):
        print(line)
    return 0


async def estimate_answer(args: argparse.Namespace, settings: Settings | None = None) -> Any:
    """The ``obatch.protocol.DurationEstimate`` the command prints: the server's estimate for the same file and
    settings (``obatch.bench.service``), on the store of ``settings`` (default: the command's)."""
    if not args.model and not args.file:
        raise errors.ConfigError("--model is required (or --file, or --history).")
    if args.pilot and not args.file:
        raise errors.ConfigError("--pilot runs lines of a batch file: give --file.")
    settings = settings or _settings(args)
    common = {"model": args.model, "num_ctx": args.num_ctx, "concurrency": args.concurrency,
              "schedule": args.schedule or settings.schedule}
    if args.file:  # a pilot runs on the engine of --backend / --url
        from obatch.bench import estimate_file

        chosen = settings.model_copy(update={"backend": args.backend}) if _backend(args) else settings
        return await estimate_file(args.file, pilot=args.pilot, backend=_backend(args),
                                   settings=chosen.with_urls([args.url] if args.url else []), **common)
    from obatch.bench.service import estimate as make_estimate
    from obatch.store.db import open_store

    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            return await make_estimate(session, settings, None, backend=_backend(args), num_requests=args.requests,
                                       prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, **common)
    finally:
        await engine.dispose()


def _pilot(value: str) -> int | str:
    """``--pilot``: a number of lines or ``auto`` (its range is checked where the pilot runs)."""
    return value if value == "auto" else int(value)


def describe(made: Any) -> list[str]:
    """An estimate (``obatch.protocol.DurationEstimate``) as the command line prints it."""
    out = ["answer lengths unknown: the duration below is a guess and its interval what the model could do; "
           "run a pilot first (--pilot auto) to measure them"] if made.guess and made.pilot is None else []
    for part in made.groups or [made]:
        out.append(f"{part.model} on {part.backend}: {part.num_requests} requests × ~{part.prompt_tokens_mean or 0:.0f}"
                   f" prompt + ~{part.output_tokens_mean or 0:.0f} output tokens")
        out.append(f"  at num_ctx {part.num_ctx}, concurrency {part.concurrency}: "
                   f"{'a guess of ' if part.guess else ''}{part.seconds:.1f} s "
                   f"[{part.low:.1f}, {part.high:.1f}] ({part.req_per_s or 0:.2f} req/s predicted, load "
                   f"{part.load_seconds:.1f} s)")
        if part.measured_req_per_s:
            out.append(f"  the points it rests on measured {part.measured_req_per_s:.2f} req/s on their own workload")
        if part.best is not None:
            out.append(f"  best config: num_ctx {part.best.num_ctx}, concurrency {part.best.concurrency} "
                       f"({part.best.seconds:.1f} s)")
        if part.points:
            out.append(f"  rests on points {', '.join(str(p.id) for p in part.points)}")
        if part.done_requests:
            out.append(f"  {part.done_requests} line(s) already run by the pilot: the batch takes them as finished")
        for note in part.notes:
            out.append(f"  note: {note}")
    if made.groups:
        out.append(f"total: {made.seconds:.1f} s [{made.low:.1f}, {made.high:.1f}]")
    if made.pilot is not None:
        p = made.pilot
        out.append(f"pilot{' (automatic)' if p.auto else ''}: {p.requests} lines"
                   f"{f' of {p.lines}' if p.lines else ''} ({p.ran} run now in {p.seconds:.1f} s, {p.reused} from an "
                   f"earlier pilot, {p.failed} failed)")
    if made.deadline is not None:
        out.append(f"completion window: {made.deadline.message}")
    return out


async def export(args: argparse.Namespace) -> int:
    """Write every benchmark point (of ``--model``) with its run's environment to a CSV or JSON file."""
    fmt = args.format or Path(args.output).suffix.lstrip(".").lower()
    if fmt not in ("csv", "json"):
        raise errors.ConfigError(f"Say --format csv or json (or name the file .csv / .json); got {args.output!r}.")
    if args.server:
        from obatch.client import Client, ClientError

        with Client(args.server, api_key=args.api_key or None) as api:
            try:
                body = await asyncio.to_thread(api.export_benchmarks, fmt, models=args.model)
            except ClientError as exc:
                raise errors.ObatchError(str(exc)) from None
    else:
        from obatch.bench import frames
        from obatch.store.db import open_store

        engine, sessions = await open_store(_settings(args).db_url)
        try:
            async with sessions() as session:
                body = await frames.export(session, fmt, models=args.model)
        finally:
            await engine.dispose()
    await asyncio.to_thread(Path(args.output).write_bytes, body)
    print(f"wrote {args.output} ({len(body):,} bytes, {fmt})")
    return 0


def _backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS,
                   help="default: OBATCH_BACKEND; sim: an in-process Ollama simulator (figures kept apart)")
    p.add_argument("--url", help="the backend's URL (Ollama root, or an OpenAI-compatible base ending in /v1)")
    p.add_argument("--data-dir", help="where the store lives (default: OBATCH_DATA_DIR or ./data)")


def add_parsers(sub: Any) -> None:
    """Register ``bench``, ``sweep`` and ``estimate`` on ``obatch``'s subparsers."""
    b = sub.add_parser("bench", help="benchmark models × num_ctx × concurrency (resumable; stored for estimates)")
    b.add_argument("--model", "-m", action="append", required=True, help="a model to measure (repeatable)")
    b.add_argument("--num-ctx", type=_ints, default=[2048], help="context windows, e.g. 2048,8192")
    b.add_argument("--concurrency", "-c", type=_ints,
                   help="levels of requests in flight, e.g. 1,2,4,8 (default 1,2,4; none with --rate alone)")
    b.add_argument("--rate", type=_rates,
                   help="request rates (requests/s), e.g. 2,4,8: requests are sent on that schedule whatever the "
                        "engine answers (open loop), beside or instead of --concurrency")
    b.add_argument("--arrival", choices=["poisson", "constant"], default="poisson",
                   help="gaps between requests at a --rate: exponential (poisson, seeded by --seed) or fixed")
    b.add_argument("--max-concurrency", type=int, default=0, metavar="N",
                   help="at most N requests in flight at a --rate (they wait for a slot); default: no cap")
    b.add_argument("--requests", "-n", type=int, default=32, help="measured requests per point")
    b.add_argument("--workload", "-w", default="chat",
                   help="tiny|short|chat|long-prompt|long-output, 'prompt=64-512,output=32-128', or a batch file")
    b.add_argument("--repeats", "-r", type=int, default=1, help="repeats of each point (their spread is shown)")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each point")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-failure-rate", type=float, default=0.05,
                   help="points failing more than this are marked and not averaged in")
    b.add_argument("--name", help="a label for the run")
    b.add_argument("--fresh", action="store_true", help="start a new run even if an identical one is unfinished")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.add_argument("--slo", help="also report goodput and the capacity under this SLO, e.g. ttft=500ms,tpot=50ms "
                                 "(bounds: ttft, tpot, latency; ms or s)")
    b.add_argument("--server", help="an obatch server URL: the server runs the sweep on its backend and stores "
                                    "the points (built-in workloads only)")
    b.add_argument("--api-key", default=os.environ.get("OBATCH_API_KEY"),
                   help="the server's API key (default: OBATCH_API_KEY)")
    _backend_options(b)
    b.set_defaults(handler=bench)

    x = sub.add_parser("bench-export", help="write benchmark points with their environment to CSV or JSON")
    x.add_argument("output", help="the file to write (.csv or .json)")
    x.add_argument("--format", choices=["csv", "json"], help="default: from the file's suffix")
    x.add_argument("--model", "-m", action="append", help="only this model (repeatable)")
    x.add_argument("--server", help="export an obatch server's points instead of the local store's")
    x.add_argument("--api-key", default=os.environ.get("OBATCH_API_KEY"), help="the server's API key")
    x.add_argument("--data-dir", help="where the store lives (default: OBATCH_DATA_DIR or ./data)")
    x.set_defaults(handler=export)

    s = sub.add_parser("sweep", help="run notebooks/sweep.ipynb with papermill into data/runs/<time>-<name>.ipynb")
    s.add_argument("--param", "-p", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter (JSON or text), e.g. -p models=smollm2:135m -p num_ctx=[2048,8192]")
    s.add_argument("--name", default="sweep", help="names the executed notebook and the run")
    s.add_argument("--notebook", help=f"the notebook to execute (default: {SWEEP_NOTEBOOK})")
    s.add_argument("--data-dir", help="where the store and runs/ live (default: OBATCH_DATA_DIR or ./data)")
    s.set_defaults(handler=sweep)

    e = sub.add_parser("estimate", help="how long a workload will take, from stored benchmarks")
    e.add_argument("--model", "-m")
    e.add_argument("--requests", "-n", type=int)
    e.add_argument("--prompt-tokens", type=float)
    e.add_argument("--output-tokens", type=float)
    e.add_argument("--file", "-f", help="a batch input file instead of the three numbers")
    e.add_argument("--num-ctx", type=int, help="estimate for this num_ctx (default: the best config)")
    e.add_argument("--concurrency", "-c", type=int, help="estimate for this concurrency (default: the level auto "
                   "concurrency is expected to settle on)")
    e.add_argument("--history", action="store_true", help="list estimate vs actual of finished batches")
    e.add_argument("--schedule", choices=("auto", "file"),
                   help="the order the batch will run its lines in, which decides how much of each prompt the "
                        "engine finds in its prefix cache (default: OBATCH_SCHEDULE, else auto)")
    e.add_argument("--completion-window", "--deadline", metavar="WINDOW",
                   help="say whether a batch of --file would meet this window ('30m', '2h'), by how much it would "
                        "miss it and which configuration would meet it")
    e.add_argument("--pilot", type=_pilot, metavar="N|auto",
                   help="run N random lines of --file first and estimate from their answers (the batch of that "
                        "file then takes them as finished); auto: 16 lines, more while their answers leave the "
                        "estimate unsure by over ±15%% (up to a quarter of the file)")
    _backend_options(e)
    e.set_defaults(handler=estimate)
