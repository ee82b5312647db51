"""The Benchmarks page's charts and tables in a real browser: Debian's Chromium (Playwright) against `obatch ui`
pointed at `obatch serve` on the Ollama simulator, after small sweeps the server runs on its own backend — first one
context window (the latency percentiles then sit at a single x, told apart by their marks), then a second window.
The throughput-vs-latency chart shows its title below the tab bar and each model's Pareto frontier; the SLO tables
show "—" where a value is missing, never a grey "None".

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.browser import MODELS, Stack, browser_page, needs_chromium, settle, shot

pytestmark = needs_chromium


def sweep(server_url: str, num_ctx: list[int]) -> None:
    """A small sweep of both simulated models at ``num_ctx``, run by the server; back once it has finished."""
    body = {"models": list(MODELS), "num_ctx": num_ctx, "concurrency": [1, 2, 4], "requests": 8,
            "workload": "short"}
    started = httpx.post(f"{server_url}/v1/benchmarks/sweeps", json=body, timeout=10)
    assert started.status_code in (200, 201), started.text
    sweep_id = started.json()["id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = httpx.get(f"{server_url}/v1/benchmarks/sweeps/{sweep_id}", timeout=10).json()
        if state["status"] not in ("queued", "in_progress", "cancelling"):
            assert state["status"] == "completed", state
            return
        time.sleep(0.5)
    raise AssertionError(f"sweep {sweep_id} did not finish in 180 s")


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    settle(page)


def no_none_cells(page: Any) -> int:
    """How many table cells say "—" (and that none says "None"), from the tables' accessibility layer."""
    cells = page.locator("[data-testid^='glide-cell']")
    texts = [t.strip() for t in cells.all_inner_texts()]
    assert texts and "None" not in texts, [t for t in texts if "None" in t]
    return texts.count("—")


def test_benchmark_charts_and_tables_after_a_sweep(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    with browser_page(browser, "charts-failure", logs=stack.logs, viewport={"width": 1400, "height": 1800}) as page:
        sweep(stack.server_url, [2048])
        page.goto(f"{stack.ui_url}/benchmarks")
        expect(page.get_by_text("Best known configuration per model")).to_be_visible(timeout=60_000)
        settle(page)
        charts = page.locator("[data-testid='stVegaLiteChart']")
        expect(charts.first.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        shot(page, "charts-1-one-window")  # latency percentiles at the single window: ●, ▲, ■ per model

        open_tab(page, "Throughput vs latency")
        tabs = page.get_by_role("tablist").first.bounding_box()
        chart = page.locator("[data-testid='stVegaLiteChart']:visible").first  # the tab's one chart
        expect(chart.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        box = chart.bounding_box()
        assert tabs is not None and box is not None
        assert box["y"] >= tabs["y"] + tabs["height"] and box["height"] >= 380  # the title and a real plot
        expect(page.get_by_text("The staircase is each model's Pareto frontier")).to_be_visible()
        shot(page, "charts-2-pareto")

        page.get_by_role("spinbutton", name="SLO: TPOT ≤ ms").fill("0.1")  # no request meets 0.1 ms per token
        page.get_by_role("spinbutton", name="SLO: TPOT ≤ ms").press("Enter")
        expect(page.get_by_text("not met at any measured concurrency").first).to_be_attached(timeout=30_000)
        settle(page)
        assert no_none_cells(page) >= len(MODELS)  # the capacity table's goodput: "—"
        shot(page, "charts-3-slo-not-met")

        sweep(stack.server_url, [4096])
        page.reload()
        expect(page.get_by_text("Best known configuration per model")).to_be_visible(timeout=60_000)
        open_tab(page, "Context window")
        expect(charts.first.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        shot(page, "charts-4-two-windows")
        open_tab(page, "Throughput vs latency")
        shot(page, "charts-5-pareto-two-windows")
        no_none_cells(page)
