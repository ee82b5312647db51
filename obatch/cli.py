"""``obatch`` command line. Handlers are coroutines; ``main`` runs one with ``asyncio.run`` and turns obatch's
errors into one line on stderr and an exit status (``api.run_sync`` is the notebook's other way onto a loop)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from obatch import errors
from obatch._extras import require
from obatch.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    if getattr(args, "url", None):
        key = "openai_base_url" if overrides.get("backend") == "openai" else "ollama_url"
        overrides[key] = args.url
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _print_problems(exc: errors.InputFileError) -> None:
    print(f"error: {exc.message}", file=sys.stderr)
    for problem in exc.problems:
        where = f"line {problem.line}" if problem.line is not None else "file"
        print(f"  {where}: [{problem.code}] {problem.message}", file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from obatch.api import run_batch_file

    report = await run_batch_file(
        Path(args.input), settings=_settings(args), model=args.model, concurrency=args.concurrency,
        output=Path(args.output) if args.output else None, errors_path=Path(args.errors) if args.errors else None,
        progress=not args.quiet, fresh=args.fresh,
    )
    print(report.summary)
    if args.show:
        from obatch.api import results_frame

        frame = await results_frame(_settings(args), report.batch.id)
        for row in frame.head(args.show).iter_rows(named=True):
            text = (row["content"] or row["error_message"] or "").strip().replace("\n", " ")
            print(f"  {row['custom_id']}: {text[:160]}")
    return 0


async def _models(args: argparse.Namespace) -> int:
    from obatch.backends import open_backend

    backend = await open_backend(_settings(args))
    try:
        print(f"backend: {backend.name}")
        for info in await backend.models():
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
    from obatch.server.observe import configure_logging

    settings = _settings(args)
    if not load_keys(settings) and not is_loopback(args.host) and not (args.allow_public or settings.allow_public_bind):
        print(f"error: no API keys are set (OBATCH_API_KEYS or OBATCH_API_KEYS_FILE), so obatch serves loopback only; "
              f"refusing to bind {args.host}. Set keys, or pass --allow-public to serve without them.",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False,
        server_header=False, timeout_graceful_shutdown=10))
    await server.serve()
    return 0 if server.started else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obatch", description="Run OpenAI Batch files through local LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def backend_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=["auto", "ollama", "openai", "local"],
                       help="default: OBATCH_BACKEND or auto (Ollama if it answers, else the embedded engine)")
        p.add_argument("--url", help="the backend's URL (Ollama root, or an OpenAI-compatible base ending in /v1)")
        p.add_argument("--data-dir", help="where the store and files live (default: OBATCH_DATA_DIR or ./data)")

    run = sub.add_parser("run", help="run a batch input file; rerun the same command to resume an interrupted run")
    run.add_argument("input", help="OpenAI Batch input file (JSONL of {custom_id, method, url, body})")
    run.add_argument("--output", "-o", help="successful lines (default: data/results/<batch>/output.jsonl)")
    run.add_argument("--errors", "-e", help="failed lines (default: data/results/<batch>/errors.jsonl)")
    run.add_argument("--model", help="use this model for every line (overrides body.model)")
    run.add_argument("--concurrency", "-c", type=int, help="requests in flight (default: OBATCH_CONCURRENCY)")
    run.add_argument("--fresh", action="store_true", help="start a new run even if an identical one is unfinished")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    run.add_argument("--show", type=int, default=0, metavar="N", help="print the first N results")
    backend_options(run)
    run.set_defaults(handler=_run)

    serve = sub.add_parser("serve", help="serve the OpenAI Files + Batches API (and chat, embeddings, models)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--allow-public", action="store_true",
                       help="bind a non-loopback host even without API keys (OBATCH_ALLOW_PUBLIC_BIND)")
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
        return int(asyncio.run(args.handler(args)))
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
