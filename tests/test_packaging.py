"""The wheel as a user installs it: the core alone in a fresh virtual environment runs a batch through the notebook
API against the simulator, and each extra's feature, missing, says in one line which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.packaging

NOTEBOOK_RUN = """
import re, subprocess, sys
import obatch
from obatch import Settings

sim = subprocess.Popen([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", "0"], stdout=subprocess.PIPE,
                       text=True)
try:
    url = re.search(r"(http://\\S+)", sim.stdout.readline()).group(1)
    settings = Settings(backend="ollama", ollama_url=url, data_dir=sys.argv[1])
    frame = obatch.run_sync([f"question {i}" for i in range(12)], model="llama3.2:1b", settings=settings,
                            concurrency=4, progress=False, max_tokens=8)
    print(frame.height, sorted(set(frame["status"])), int(frame["completion_tokens"].sum()))
    heavy = sorted(m for m in ("litestar", "uvicorn", "streamlit", "altair", "papermill", "xllamacpp", "gguf")
                   if m in sys.modules)
    print("loaded:", ",".join(heavy) or "none")
finally:
    sim.terminate()
    sim.wait()
"""


def uv(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uv", *args], capture_output=True, text=True, check=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the built wheel and only the core's dependencies (uv's cache makes this seconds)."""
    work = tmp_path_factory.mktemp("wheel")
    uv("build", "--wheel", "--out-dir", str(work / "dist"), str(ROOT))
    wheel = next((work / "dist").glob("obatch-*.whl"))
    uv("venv", "--quiet", "--python", sys.executable, str(work / "venv"))
    python = work / "venv" / "bin" / "python"
    uv("pip", "install", "--quiet", "--python", str(python), str(wheel))
    return python


def test_core_install_runs_a_batch_through_the_notebook_api(core_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(core_venv), "-c", NOTEBOOK_RUN, str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["12 ['succeeded'] 96", "loaded: none"], done.stdout


@pytest.mark.parametrize(("command", "extra"), [
    (["serve"], "server"),
    (["ui"], "ui"),
    (["run", "in.jsonl", "--backend", "local"], "local"),
    (["models", "--backend", "local"], "local"),
    (["sweep"], "notebooks"),
])
def test_a_missing_extra_is_one_line_naming_it(core_venv: Path, tmp_path: Path, command: list[str],
                                               extra: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                                       '"body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}\n')
    done = subprocess.run([str(core_venv.parent / "obatch"), *command, "--data-dir", str(tmp_path / "data")]
                          if command[0] != "ui" else [str(core_venv.parent / "obatch"), *command],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line, no traceback
    assert done.stderr.startswith("error: ") and f"pip install 'obatch[{extra}]'" in done.stderr


def test_a_missing_extra_imported_from_code_names_it(core_venv: Path) -> None:
    for module, extra in (("obatch.server", "server"), ("obatch.ui.views", "ui"), ("obatch.bench.charts", "notebooks"),
                          ("obatch.testing.tiny_gguf", "local")):
        done = subprocess.run([str(core_venv), "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("obatch.errors.MissingExtraError: "), done.stderr
        assert f"pip install 'obatch[{extra}]'" in done.stderr
