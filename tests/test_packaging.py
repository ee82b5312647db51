"""The wheel as a user installs it: the core alone in a fresh virtual environment runs a batch through the notebook
API against the simulator, and each extra's feature, missing, says in one line which extra to install; with the
``ui`` extra, every page of the UI draws and `obatch ui` serves the packaged app, outside any checkout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.packaging

UI_PAGES = """
import json, sys
from pathlib import Path
from streamlit.testing.v1 import AppTest
from obatch.ui.launch import find_app
from obatch.ui.session import CLIENT_KEY
from ui_fake import FakeServer  # tests/ui_fake.py, copied next to this script: no checkout on sys.path

app = find_app({})
shown = {"app": str(app)}
for name in ("app.py", "pages/batches.py", "pages/benchmarks.py", "pages/models.py"):
    at = AppTest.from_file(str(app.parent / name), default_timeout=120)
    at.session_state[CLIENT_KEY] = FakeServer().client()
    at.run()
    shown[name] = {
        "exceptions": [e.message for e in at.exception],
        "titles": [t.value for t in at.title],
        "metrics": [m.label for m in at.metric],
        "uploaders": len(at.get("file_uploader")),
        "tabs": [t.label for t in at.tabs],
        "tables": [list(d.value.columns) for d in at.dataframe],
    }
print(json.dumps(shown))
"""

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
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    uv("build", "--wheel", "--out-dir", str(dist), str(ROOT))
    return next(dist.glob("obatch-*.whl"))


def venv_with(wheel: Path, work: Path, extras: str = "") -> Path:
    """A fresh venv holding the built wheel with these extras' dependencies (uv's cache makes this seconds)."""
    uv("venv", "--quiet", "--python", sys.executable, str(work / "venv"))
    python = work / "venv" / "bin" / "python"
    uv("pip", "install", "--quiet", "--python", str(python), f"obatch{extras} @ {wheel.as_uri()}")
    return python


@pytest.fixture(scope="module")
def core_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the core's dependencies."""
    return venv_with(wheel, tmp_path_factory.mktemp("core"))


@pytest.fixture(scope="module")
def ui_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core and the ``ui`` extra, as ``pip install 'obatch[ui]'`` leaves it."""
    return venv_with(wheel, tmp_path_factory.mktemp("ui"), "[ui]")


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


def test_the_ui_extra_renders_every_page_outside_the_checkout(ui_venv: Path, tmp_path: Path) -> None:
    """`pip install 'obatch[ui]'` alone: the packaged app and each page draw under AppTest (against the in-memory
    server of tests/ui_fake.py), from a folder that holds no checkout."""
    (tmp_path / "ui_fake.py").write_bytes((ROOT / "tests" / "ui_fake.py").read_bytes())
    (tmp_path / "pages.py").write_text(UI_PAGES)
    done = subprocess.run([str(ui_venv), "pages.py"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OBATCH_UI_APP")})
    assert done.returncode == 0, done.stderr
    shown = orjson.loads(done.stdout.splitlines()[-1])
    packaged = next(ui_venv.parent.parent.glob("lib/python*/site-packages/obatch/ui")).resolve()
    assert Path(shown.pop("app")) == packaged / "app.py"
    assert all(not page["exceptions"] for page in shown.values()), shown
    assert shown["app.py"]["titles"] == ["obatch"]
    assert shown["app.py"]["metrics"] == ["Backend", "Batches running", "Batches (last 100)"]
    assert shown["pages/batches.py"]["titles"] == ["Batches"] and shown["pages/batches.py"]["uploaders"] == 1
    assert shown["pages/benchmarks.py"]["titles"] == ["Benchmarks"]
    assert "Context window" in shown["pages/benchmarks.py"]["tabs"]
    assert shown["pages/models.py"]["titles"] == ["Models / backend"]
    assert ["host", "backend", "state", "concurrency", "why", "in flight", "served", "models"] in \
        shown["pages/models.py"]["tables"]


def test_obatch_ui_from_the_wheel_serves_the_packaged_app(ui_venv: Path, tmp_path: Path) -> None:
    """`obatch ui` outside a checkout starts Streamlit on the packaged app, with its config (the developer menu
    hidden)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBATCH_")}
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([str(ui_venv.parent / "obatch"), "ui", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ui.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        (child,) = subprocess.run(["ps", "-o", "pid=", "--ppid", str(ui.pid)], capture_output=True,
                                  text=True).stdout.split()  # Streamlit, started by `obatch ui`
        command = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        packaged = next(ui_venv.parent.parent.glob("lib/python*/site-packages/obatch/ui")).resolve()
        assert command[command.index("run") + 1] == str(packaged / "app.py")
        folder = Path(f"/proc/{child}/cwd").resolve()  # where Streamlit reads .streamlit/config.toml
        assert folder == packaged
        assert 'toolbarMode = "viewer"' in (folder / ".streamlit" / "config.toml").read_text()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
