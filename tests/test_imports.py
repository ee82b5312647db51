"""The core imports no web or UI framework and creates nothing at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CHECK = """
import sys, obatch, obatch.batches, obatch.runner, obatch.worker, obatch.backends.ollama, obatch.backends.openai
import obatch.backends.local, obatch.store.repo, obatch.jsonl, obatch.context, obatch.api, obatch.cli
loaded = sorted(m for m in ("litestar", "streamlit", "uvicorn") if m in sys.modules)
print(",".join(loaded) or "clean")
"""


def test_core_imports_no_web_or_ui_framework(tmp_path: object) -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"


def test_public_api() -> None:
    import obatch

    assert set(obatch.__all__) >= {"run", "run_sync", "run_batch_file", "Settings", "results_frame"}
    assert all(hasattr(obatch, name) for name in obatch.__all__)


def test_a_command_line_starts_without_the_heavy_libraries(tmp_path: object) -> None:
    """`obatch run` pays only for what it uses: frames (polars), migrations (alembic, when the schema is current),
    httpx and the web/UI frameworks load on demand."""
    check = ("import sys, obatch.cli, obatch.api, obatch.batches; obatch.cli._parser()\n"
             "print(','.join(sorted(m for m in ('polars', 'alembic', 'httpx', 'altair', 'litestar') "
             "if m in sys.modules)) or 'lean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "lean"


def test_the_batch_lifecycle_imports_nothing_from_the_benchmarks(tmp_path: object) -> None:
    """The core does not depend on the analytics: the estimator reaches ``obatch.batches`` as an injected hook
    (``Services.estimator``), never as an import, so ``obatch.bench`` may import the core and not the reverse."""
    import obatch.batches

    for module in Path(obatch.batches.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("obatch.bench")], module.name
    check = ("import sys, obatch.batches\n"
             "print(','.join(sorted(m for m in sys.modules if m.startswith('obatch.bench'))) or 'clean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"


def test_the_servers_batch_process_loads_no_web_framework(tmp_path: object) -> None:
    """The batch process drives engines and the store only: every library it loads without need is memory
    the server's pair of processes holds for nothing (Litestar alone is about 40 MB)."""
    check = ("import sys, obatch.server.batchproc\n"
             "print(','.join(sorted(m for m in ('litestar', 'uvicorn', 'streamlit') if m in sys.modules)) or 'clean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"

