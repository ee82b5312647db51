"""The UI in a real browser: Debian's Chromium driven by Playwright against `obatch ui` + `obatch serve` + the
Ollama simulator, all real processes on loopback. What a new user does: open the UI, upload the sample file,
submit, watch it complete, download the output, look at the benchmark charts and the models.

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.helpers import ROOT
from tests.serverkit import free_port, server_env

ARTIFACTS = ROOT / "tests" / "artifacts"
SAMPLE = ROOT / "data" / "samples" / "chat.jsonl"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
MODELS = ("smollm2:135m", "llama3.2:1b")

pytestmark = [
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Simulator → `obatch serve` → `obatch ui`, each a real process on a free loopback port."""
    tmp = tmp_path_factory.mktemp("browser")
    sim_port, server_port, ui_port = free_port(), free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OBATCH_")}
    children: list[Child] = []
    try:  # start all three at once (each takes seconds to import), then wait for them in order
        sim_url, server_url, ui_url = (f"http://127.0.0.1:{p}" for p in (sim_port, server_port, ui_port))
        sim = start([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", str(sim_port), "--num-parallel", "4",
                     "--decode-tps", "400", *[a for m in MODELS for a in ("--model", m)]], base_env,
                    tmp / "sim.log", tmp)
        children.append(sim)
        data_dir = tmp / "data"
        env = server_env(data_dir, sim_url)
        server = start([sys.executable, "-m", "obatch", "serve", "--port", str(server_port)], env,
                       tmp / "server.log", tmp)
        children.append(server)
        ui = start([sys.executable, "-m", "obatch", "ui", "--port", str(ui_port)],
                   dict(base_env, OBATCH_SERVER_URL=server_url), tmp / "ui.log", ROOT)
        children.append(ui)
        wait_http(f"{sim_url}/api/version", sim)
        wait_http(f"{server_url}/health", server)
        seed_benchmarks(env, tmp)
        wait_http(f"{ui_url}/_stcore/health", ui)
        yield Stack(sim_url, server_url, ui_url, data_dir)
    finally:
        for child in reversed(children):
            child.stop()


def seed_benchmarks(env: dict[str, str], cwd: Path) -> None:
    """A tiny sweep (two models × three windows × two concurrencies) into the server's store, through the CLI,
    so the benchmark page has points to draw."""
    args = [sys.executable, "-m", "obatch", "bench", *[a for m in MODELS for a in ("--model", m)],
            "--num-ctx", "2048,4096,8192", "--concurrency", "1,2", "--requests", "4", "--workload", "tiny",
            "--warmup", "0", "--name", "browser-seed", "--quiet"]
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def settle(page: object) -> None:
    """Wait until Streamlit has finished running the page's script (what a person would wait for)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']",  # type: ignore[attr-defined]
                           timeout=30_000)
    page.wait_for_timeout(300)  # type: ignore[attr-defined]


def shot(page: object, name: str) -> None:
    settle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_upload_run_download_and_charts_in_a_real_browser(stack: Stack, browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 2000}, accept_downloads=True)  # type: ignore[attr-defined]
    page = context.new_page()
    try:
        page.goto(stack.ui_url)
        expect(page.get_by_text("Server up · backend ollama")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Batches running")).to_be_visible(timeout=30_000)
        shot(page, "ui-0-home")

        page.get_by_role("link", name="Batches").first.click()
        expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible(timeout=30_000)
        bad = tmp_path / "broken.jsonl"
        lines = SAMPLE.read_bytes().splitlines(keepends=True)
        bad.write_bytes(lines[0] + b'{"custom_id": "oops", "method": "GET"}\n' + lines[1] + lines[0] + b"{not json\n")
        page.locator("input[type=file]").set_input_files(str(bad))
        expect(page.get_by_text("3 problem(s) in 5 line(s)")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("button", name="Submit batch")).to_be_disabled()
        expect(page.get_by_text("Every line (bad ones in red)")).to_be_visible()  # opened: the file is bad
        shot(page, "ui-1-invalid")
        page.locator("input[type=file]").set_input_files(str(SAMPLE))
        expect(page.get_by_text("8 requests, all valid")).to_be_visible(timeout=30_000)
        shot(page, "ui-2-validated")
        page.get_by_role("button", name="Submit batch").click()
        expect(page.get_by_text("Submitted")).to_be_visible(timeout=30_000)
        status = page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(r"^completed$"))
        expect(status).to_be_visible(timeout=60_000)  # the batch's status line, refreshed live
        download_button = page.get_by_role("button", name="Download output")
        expect(download_button).to_be_visible(timeout=30_000)
        shot(page, "ui-3-completed")
        with page.expect_download() as info:
            download_button.click()
        saved = tmp_path / "output.jsonl"
        info.value.save_as(saved)
        output = [orjson.loads(line) for line in saved.read_bytes().splitlines() if line.strip()]
        expected = sorted(orjson.loads(line)["custom_id"] for line in SAMPLE.read_bytes().splitlines() if line.strip())
        assert sorted(line["custom_id"] for line in output) == expected
        assert all(line["response"]["status_code"] == 200 for line in output)

        page.get_by_role("link", name="Benchmarks").first.click()
        expect(page.get_by_role("heading", name="Benchmarks", exact=True)).to_be_visible(timeout=30_000)
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        expect(chart).to_be_visible(timeout=30_000)
        expect(chart.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        shot(page, "ui-4-benchmarks")
        page.get_by_role("tab", name="Compare").click()
        shot(page, "ui-4b-compare")
        page.get_by_role("tab", name="Estimate vs actual").click()
        shot(page, "ui-4c-estimates")
        page.get_by_role("tab", name="Run a sweep").click()
        expect(page.get_by_role("button", name="Start sweep")).to_be_visible()
        shot(page, "ui-4d-sweep")

        page.get_by_role("link", name="Models / backend").first.click()
        expect(page.get_by_text("Backend reachable")).to_be_visible(timeout=30_000)
        expect(page.locator("[data-testid='stDataFrame']").last).to_be_visible()  # the engine hosts, then the models
        cell = page.locator("[data-testid^='glide-cell']", has_text="smollm2:135m")  # the grid's a11y layer
        expect(cell.first).to_be_attached()
        shot(page, "ui-5-models")
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "ui-failure.png"), full_page=True)
        raise
    finally:
        context.close()
