"""``obatch`` command line. Handlers are coroutines; ``main`` runs one on obatch's loop (``_loop.run``) and turns
obatch's errors into one line on stderr and an exit status (``api.run_sync`` is the notebook's other way onto a
loop)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from obatch import _loop, errors
from obatch._extras import require
from obatch.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "concurrency", None) is not None and not isinstance(args.concurrency, list):
        overrides["concurrency"] = args.concurrency
    return Settings(**overrides).with_urls(getattr(args, "url", None) or [])


def concurrency_arg(value: str) -> int | str:
    """``--concurrency``: ``auto`` or a number of requests in flight per engine host."""
    if value == "auto":
        return value
    try:
        level = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None
    if not 1 <= level <= 1024:
        raise argparse.ArgumentTypeError("concurrency must be between 1 and 1024")
    return level


def _print_problems(exc: errors.InputFileError) -> None:
    print(f"error: {exc.message}", file=sys.stderr)
    for problem in exc.problems:
        where = f"line {problem.line}" if problem.line is not None else "file"
        print(f"  {where}: [{problem.code}] {problem.message}", file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from obatch._heap import settle
    from obatch.api import run_batch_file

    settle()  # the imports live as long as the run: out of every later collection
    report = await run_batch_file(
        Path(args.input), settings=_settings(args), model=args.model,
        output=Path(args.output) if args.output else None, errors_path=Path(args.errors) if args.errors else None,
        progress=not args.quiet, fresh=args.fresh, output_retries=args.output_retries, schedule=args.schedule,
        cache=args.cache, completion_window=args.completion_window, strict_window=args.strict_window,
    )
    print(report.summary)
    if args.show:
        from obatch.api import results_frame

        frame = await results_frame(_settings(args), report.batch.id)
        for row in frame.head(args.show).iter_rows(named=True):
            text = (row["content"] or row["error_message"] or "").strip().replace("\n", " ")
            print(f"  {row['custom_id']}: {text[:160]}")
    return 0


async def _retry(args: argparse.Namespace) -> int:
    from obatch._heap import settle
    from obatch.api import retry_batch

    settle()
    report = await retry_batch(
        args.batch_id, codes=args.codes, settings=_settings(args), progress=not args.quiet,
        output=Path(args.output) if args.output else None, errors_path=Path(args.errors) if args.errors else None)
    print(f"retry of {args.batch_id}: {report.summary}")
    return 0


async def _results(args: argparse.Namespace) -> int:
    import asyncio

    from obatch.batches.reading import follow
    from obatch.store.db import open_store

    engine, sessions = await open_store(_settings(args).db_url)
    out = sys.stdout.buffer
    try:
        async for line in follow(sessions, args.batch_id, merged=args.merged,
                                 interval=args.interval if args.follow else None):
            await asyncio.to_thread(out.write, line)
            if args.follow:
                await asyncio.to_thread(out.flush)
    finally:
        await engine.dispose()
    await asyncio.to_thread(out.flush)
    return 0


def codes_arg(value: str) -> list[str]:
    """``--codes``: error codes separated by commas."""
    return [code.strip() for code in value.split(",") if code.strip()]


async def _models(args: argparse.Namespace) -> int:
    from obatch.backends import open_backend
    from obatch.backends.base import with_trained_context
    from obatch.backends.pool import Pool

    settings = _settings(args)
    backend = await open_backend(settings)
    try:
        print(f"backend: {backend.name}")
        pool = Pool.of(backend, concurrency=settings.concurrency, maximum=settings.max_concurrency)
        for host in pool.hosts:
            try:
                listed = await host.backend.models()
            except errors.BackendError as exc:
                print(f"host {host.url}: unreachable ({exc.message})")
                continue
            print(f"host {host.url} ({host.backend.name}): up, concurrency {host.limit.level} "
                  f"({host.limit.reason}), slots reported: {await host.backend.slots() or 'none'}")
            for info in await asyncio.gather(*(with_trained_context(host.backend, m) for m in listed)):
                ctx = f"context {info.context_length}" if info.context_length else ""
                loaded = f"loaded (num_ctx {info.loaded_context_length})" if info.loaded else ""
                print(f"  {info.id:32} {info.parameter_size or '':8} {info.quantization or '':8} {ctx} {loaded}")
    finally:
        await backend.aclose()
    return 0


async def _ui(args: argparse.Namespace) -> int:
    from obatch.ui.launch import run_ui

    return await run_ui(host=args.host, port=args.port, server_url=args.server_url)


async def _serve(args: argparse.Namespace) -> int:
    require("server")
    import uvicorn

    from obatch.server import create_app
    from obatch.server.auth import is_loopback, load_keys
    from obatch.server.guard import plain_http_problem, server_options
    from obatch.server.observe import configure_logging

    settings = _settings(args).model_copy(update={k: v for k, v in (
        ("ssl_certfile", args.ssl_certfile), ("ssl_keyfile", args.ssl_keyfile),
        ("allow_plain_http", args.allow_plain_http or None)) if v is not None})
    if not load_keys(settings) and not is_loopback(args.host) and not (args.allow_public or settings.allow_public_bind):
        print(f"error: no API keys are set (OBATCH_API_KEYS or OBATCH_API_KEYS_FILE), so obatch serves loopback only; "
              f"refusing to bind {args.host}. Set keys, or pass --allow-public to serve without them.",
              file=sys.stderr)
        return 2
    if problem := plain_http_problem(settings, args.host, is_loopback(args.host)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False,
        server_header=False, timeout_graceful_shutdown=10, **server_options(settings)))
    await server.serve()
    return 0 if server.started else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obatch", description="Run OpenAI Batch files through local LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def backend_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=["auto", "ollama", "openai", "local"],
                       help="default: OBATCH_BACKEND or auto (Ollama if it answers, else the embedded engine)")
        p.add_argument("--url", action="append", metavar="URL",
                       help="an engine host: an Ollama root, or an OpenAI-compatible base ending in /v1; repeat it "
                            "(or separate URLs by commas) to drive several hosts as one pool")
        p.add_argument("--data-dir", help="where the store and files live (default: OBATCH_DATA_DIR or ./data)")

    run = sub.add_parser("run", help="run a batch input file; rerun the same command to resume an interrupted run")
    run.add_argument("input", help="OpenAI Batch input file (JSONL of {custom_id, method, url, body})")
    run.add_argument("--output", "-o", help="successful lines (default: data/results/<batch>/output.jsonl)")
    run.add_argument("--errors", "-e", help="failed lines (default: data/results/<batch>/errors.jsonl)")
    run.add_argument("--model", help="use this model for every line (overrides body.model)")
    run.add_argument("--concurrency", "-c", type=concurrency_arg,
                     help="requests in flight per engine host, or 'auto' to find the best level by measuring "
                          "(default: OBATCH_CONCURRENCY, else auto)")
    run.add_argument("--schedule", choices=("auto", "file"),
                     help="the order lines run in: 'auto' keeps lines sharing a long prompt prefix on one engine slot "
                          "and starts the longest first; 'file' keeps the file's order (default: OBATCH_SCHEDULE, "
                          "else auto)")
    run.add_argument("--completion-window", "--deadline", metavar="WINDOW",
                     help="the batch's window ('30m', '2h', '1d'; default 7d): its estimate is compared with it before "
                          "it starts, with a warning when it is expected to miss it, by how much and what would meet "
                          "it; lines still running at its end expire")
    run.add_argument("--strict-window", action="store_true",
                     help="refuse the run when even the estimate's lower bound is past --completion-window")
    run.add_argument("--fresh", action="store_true", help="start a new run even if an identical one is unfinished")
    run.add_argument("--output-retries", type=int, metavar="N",
                     help="ask a line that wants JSON (response_format, format) again up to N times when its answer "
                          "is not that JSON, then fail it as invalid_output (default: OBATCH_OUTPUT_RETRIES, else 2)")
    run.add_argument("--cache", choices=["auto", "off", "all"],
                     help="reuse stored answers: auto (requests at temperature 0 or with a seed, and embeddings), "
                          "all (sampled requests too) or off (default: OBATCH_CACHE, else auto)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    run.add_argument("--show", type=int, default=0, metavar="N", help="print the first N results")
    backend_options(run)
    run.set_defaults(handler=_run)

    retry = sub.add_parser("retry", help="run again only the lines of a batch that failed for reasons a retry can "
                                         "change (engine errors, timeouts, lines left unrun)")
    retry.add_argument("batch_id", help="a batch of the local store (the run's summary names it)")
    retry.add_argument("--codes", type=codes_arg, metavar="CODE[,CODE...]",
                       help="retry the lines that failed with these error codes instead (e.g. invalid_request)")
    retry.add_argument("--output", "-o", help="successful lines (default: data/results/<retry batch>/output.jsonl)")
    retry.add_argument("--errors", "-e", help="failed lines (default: data/results/<retry batch>/errors.jsonl)")
    retry.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    backend_options(retry)
    retry.set_defaults(handler=_retry)

    results = sub.add_parser("results", help="print a batch's finished output and error lines (JSONL), also while "
                                             "it runs")
    results.add_argument("batch_id", help="a batch of the local store")
    results.add_argument("--follow", "-f", action="store_true",
                         help="print each line once as it finishes, in input order, until the batch is final")
    results.add_argument("--merged", action="store_true",
                         help="over the batch's retries: each line's latest outcome")
    results.add_argument("--interval", type=float, default=1.0, help="seconds between reads with --follow")
    results.add_argument("--data-dir", help="where the store and files live (default: OBATCH_DATA_DIR or ./data)")
    results.set_defaults(handler=_results)

    serve = sub.add_parser("serve", help="serve the OpenAI Files + Batches API (and chat, embeddings, models)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--allow-public", action="store_true",
                       help="bind a non-loopback host even without API keys (OBATCH_ALLOW_PUBLIC_BIND)")
    serve.add_argument("--ssl-certfile", type=Path, help="serve HTTPS with this PEM certificate (OBATCH_SSL_CERTFILE)")
    serve.add_argument("--ssl-keyfile", type=Path, help="the certificate's PEM private key (OBATCH_SSL_KEYFILE)")
    serve.add_argument("--allow-plain-http", action="store_true",
                       help="bind a non-loopback host over plain HTTP, without TLS or a trusted proxy in front "
                            "(OBATCH_ALLOW_PLAIN_HTTP)")
    backend_options(serve)
    serve.set_defaults(handler=_serve)

    from obatch.bench.cli import add_parsers as add_bench_parsers

    add_bench_parsers(sub)  # bench, sweep, estimate

    models = sub.add_parser("models", help="list the backend's models")
    backend_options(models)
    models.set_defaults(handler=_models)

    ui = sub.add_parser("ui", help="open the Streamlit UI (a client of `obatch serve`)")
    ui.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default: loopback)")
    ui.add_argument("--port", type=int, default=8501)
    ui.add_argument("--server-url", help="the obatch server (default: OBATCH_SERVER_URL or http://127.0.0.1:8000)")
    ui.set_defaults(handler=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_loop.run(args.handler(args)))
    except errors.InputFileError as exc:
        _print_problems(exc)
        return 2
    except errors.ObatchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
