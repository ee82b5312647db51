"""A sweep from the Benchmarks page in a real browser: Debian's Chromium (Playwright) against `obatch ui` pointed
only at `obatch serve` (its own data dir) on the Ollama simulator. The page starts empty, the form sends the sweep
to the server, the server measures its own backend, and the points appear on the page and in
`GET /v1/benchmarks/models`.

Screenshots of each state go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import test_ui_browser
from tests.helpers import ROOT
from tests.serverkit import free_port, server_env
from tests.test_ui_browser import ARTIFACTS, CHROMIUM, Child, settle, shot, start, wait_http

browser = test_ui_browser.browser  # the same Chromium fixture

MODELS = ("qwen2.5:0.5b", "llama3.2:1b")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser installs it)"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """Simulator → `obatch serve` (no benchmark yet) → `obatch ui` with only OBATCH_SERVER_URL: (server, ui, logs)."""
    tmp = tmp_path_factory.mktemp("sweep-browser")
    sim_port, server_port, ui_port = free_port(), free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OBATCH_")}
    children: list[Child] = []
    try:
        sim_url, server_url, ui_url = (f"http://127.0.0.1:{p}" for p in (sim_port, server_port, ui_port))
        children.append(start([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", str(sim_port),
                               "--num-parallel", "4", "--decode-tps", "400",
                               *[a for m in MODELS for a in ("--model", m)]], base_env, tmp / "sim.log", tmp))
        children.append(start([sys.executable, "-m", "obatch", "serve", "--port", str(server_port)],
                              server_env(tmp / "data", sim_url), tmp / "server.log", tmp))
        children.append(start([sys.executable, "-m", "obatch", "ui", "--port", str(ui_port)],
                              dict(base_env, OBATCH_SERVER_URL=server_url), tmp / "ui.log", ROOT))
        for child, url in zip(children, (f"{sim_url}/api/version", f"{server_url}/health",
                                         f"{ui_url}/_stcore/health"), strict=True):
            wait_http(url, child)
        yield server_url, ui_url, tmp
    finally:
        for child in reversed(children):
            child.stop()


def test_a_sweep_from_the_benchmarks_page_measures_the_servers_backend(stack: tuple[str, str, Path],
                                                                        browser: object) -> None:
    from playwright.sync_api import expect

    server_url, ui_url, logs = stack
    context = browser.new_context(viewport={"width": 1400, "height": 1800})  # type: ignore[attr-defined]
    page = context.new_page()
    try:
        page.goto(ui_url)
        page.get_by_role("link", name="Benchmarks").first.click()
        expect(page.get_by_role("heading", name="Benchmarks", exact=True)).to_be_visible(timeout=30_000)
        expect(page.get_by_text("No benchmark yet")).to_be_visible(timeout=30_000)
        start_button = page.get_by_role("button", name="Start sweep")
        expect(start_button).to_be_visible()
        settle(page)
        assert page.locator("[data-testid='stVegaLiteChart']").count() == 0  # no empty charts
        shot(page, "sweep-0-empty")

        start_button.click()  # the form's defaults: the first model, num_ctx 2048, concurrency 1 and 2
        progress = page.get_by_text("point(s) measured")
        expect(progress.first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "sweep-1-running.png"), full_page=True)
        expect(page.get_by_text("Sweep finished: 2 point(s) measured on ollama")).to_be_visible(timeout=120_000)
        table = page.get_by_text("Best known configuration per model")
        expect(table).to_be_visible(timeout=30_000)
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        expect(chart.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        shot(page, "sweep-2-done")

        first = httpx.get(f"{server_url}/v1/models", timeout=10).json()["data"][0]["id"]  # the form's default
        best = httpx.get(f"{server_url}/v1/benchmarks/models", timeout=10).json()["data"]
        assert [(b["model"], b["backend"], b["num_ctx"]) for b in best] == [(first, "ollama", 2048)]
        points = httpx.get(f"{server_url}/v1/benchmarks/models/{first}", timeout=10).json()["data"]
        assert sorted(p["concurrency"] for p in points) == [1, 2] and {p["backend"] for p in points} == {"ollama"}
        cell = page.locator("[data-testid^='glide-cell']", has_text=first)  # the best table's a11y layer
        expect(cell.first).to_be_attached()
        selected = page.locator("[data-testid='stMultiSelect']").filter(has_text=first)  # the sweep's model
        expect(selected.first).to_be_visible()

        for tab, name in (("Concurrency", "sweep-3-concurrency"), ("Throughput vs latency", "sweep-4-pareto"),
                          ("Compare", "sweep-5-compare"), ("Run a sweep", "sweep-6-form-again")):
            page.get_by_role("tab", name=tab).click()
            shot(page, name)
        expect(page.get_by_role("button", name="Start sweep")).to_be_visible()
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "sweep-failure.png"), full_page=True)
        print((logs / "server.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        context.close()
