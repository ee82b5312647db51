"""A sweep from the Benchmarks page in a real browser: Debian's Chromium (Playwright) against `obatch ui` pointed
only at `obatch serve` (its own data dir) on the Ollama simulator. The page starts empty, the form sends the sweep
to the server, the server measures its own backend, and the points appear on the page and in
`GET /v1/benchmarks/models`.

Screenshots of each state go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.browser import ARTIFACTS, Stack, browser_page, needs_chromium, settle, shot

pytestmark = needs_chromium


def test_a_sweep_from_the_benchmarks_page_measures_the_servers_backend(stack: Stack,
                                                                        browser: Any) -> None:
    from playwright.sync_api import expect

    server_url, ui_url, logs = stack.server_url, stack.ui_url, stack.logs
    with browser_page(browser, "sweep-failure", logs=logs, viewport={"width": 1400, "height": 1800}) as page:
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
