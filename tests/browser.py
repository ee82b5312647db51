"""The UI in a real browser, shared by the browser tests: Debian's Chromium driven by Playwright against the whole
stack — the Ollama simulator → `obatch serve` → `obatch ui`, each a real process on a free loopback port.

``stack`` and ``browser`` are module-scoped fixtures (conftest.py makes them visible): each browser test module gets
a fresh stack with an empty store. Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT
from tests.serverkit import free_port, server_env

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
MODELS = ("smollm2:135m", "llama3.2:1b")  # what the simulator serves

needs_chromium = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser installs it)"),
]


@dataclass
class Child:
    """A process started in its own session, so that stopping it also stops what it started (streamlit)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> Child:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Child(proc, log)


def wait_http(url: str, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.proc.args} exited:\n{child.log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{child.log.read_text(errors='replace')}")


@dataclass
class Stack:
    sim_url: str
    server_url: str
    ui_url: str
    data_dir: Path
    server_env: dict[str, str]  # what `obatch serve` runs with (a CLI command given it shares the server's store)
    logs: Path  # sim.log, server.log, ui.log
    sim: Child | None = None
    sim_args: tuple[list[str], dict[str, str]] | None = None
    server: Child | None = None
    server_args: list[str] | None = None

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.stop()

    def start_server(self) -> None:
        """`obatch serve` again, on its old port and store."""
        assert self.server_args is not None
        self.server = start(self.server_args, self.server_env, self.logs / "server.log", self.logs)
        wait_http(f"{self.server_url}/health", self.server)

    def stop_engine(self) -> None:
        assert self.sim is not None
        self.sim.stop()

    def start_engine(self) -> None:
        """The simulator again, on its old port (as an engine restarted in place)."""
        assert self.sim_args is not None
        self.sim = start(*self.sim_args, self.logs / "sim.log", self.logs)
        wait_http(f"{self.sim_url}/api/version", self.sim)


@contextlib.contextmanager
def running_stack(tmp: Path, sim_options: tuple[str, ...] = ("--decode-tps", "400"), **server_settings: Any
                  ) -> Iterator[Stack]:
    """Simulator → `obatch serve` (an empty store, ``server_settings`` over the test ones) → `obatch ui` pointed
    only at the server (OBATCH_SERVER_URL)."""
    sim_port, server_port, ui_port = free_port(), free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OBATCH_")}
    sim_url, server_url, ui_url = (f"http://127.0.0.1:{p}" for p in (sim_port, server_port, ui_port))
    env = server_env(tmp / "data", sim_url, **server_settings)
    sim_args = [sys.executable, "-m", "obatch.testing.ollama_sim", "--port", str(sim_port), "--num-parallel", "4",
                *sim_options, *[a for m in MODELS for a in ("--model", m)]]
    server_args = [sys.executable, "-m", "obatch", "serve", "--port", str(server_port)]
    stack = Stack(sim_url, server_url, ui_url, tmp / "data", env, tmp, sim_args=(sim_args, base_env),
                  server_args=server_args)
    ui: Child | None = None
    try:  # start all three at once (each takes seconds to import), then wait for them in order
        stack.sim = start(sim_args, base_env, tmp / "sim.log", tmp)
        stack.server = start(server_args, env, tmp / "server.log", tmp)
        ui = start([sys.executable, "-m", "obatch", "ui", "--port", str(ui_port)],
                   dict(base_env, OBATCH_SERVER_URL=server_url), tmp / "ui.log", ROOT)
        for child, url in ((stack.sim, f"{sim_url}/api/version"), (stack.server, f"{server_url}/health"),
                           (ui, f"{ui_url}/_stcore/health")):
            wait_http(url, child)
        yield stack
    finally:
        for child in (ui, stack.server, stack.sim):  # the ones running now (the engine or server restarted)
            if child is not None:
                child.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("browser")) as made:
        yield made


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def browser_page(browser: Any, failure: str, *, logs: Path | None = None, **options: Any) -> Iterator[Any]:
    """A page in a browser context of its own (``options``: ``new_context``'s, the viewport…), closed at the end. If
    the test fails meanwhile, every page of the context is shot whole first, as tests/artifacts/``failure``.png
    (a second page as ``failure``-2.png…), and with ``logs`` the tail of the server's log is printed."""
    context = browser.new_context(**options)
    page = context.new_page()
    try:
        yield page
    except Exception:
        for n, each in enumerate(context.pages, start=1):
            each.screenshot(path=str(ARTIFACTS / f"{failure}{f'-{n}' if n > 1 else ''}.png"), full_page=True)
        if logs is not None:
            print((logs / "server.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        context.close()


def settle(page: Any) -> None:
    """Wait until Streamlit has finished running the page's script (what a person would wait for)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=30_000)
    page.wait_for_timeout(300)


def shot(page: Any, name: str) -> None:
    settle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
