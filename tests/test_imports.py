"""The core imports no web or UI framework and creates nothing at import time."""

from __future__ import annotations

import subprocess
import sys

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
