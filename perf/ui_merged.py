"""What a retry chain's merged results cost the Batches page: `python perf/ui_merged.py [--lines 10000]`.

A first batch of ``--lines`` chat lines on the simulator, a share of them failed by engine errors
(``--error-rate``, each line tried once), then a retry of those on a healthy engine, both through a real
`obatch serve`. The Batches page (Streamlit's AppTest; it opens the newest batch, the retry) is drawn as it opens
the first batch (its own results read), then with the retry's "Merged results of the chain" switch turned on (the
merged lines and the ids of both batches' lines are read), and on again (the chain is final: nothing is read
again). Each draw says how many ``/results`` pages it asked for. While a retry runs the page reads the merged lines
again at each refresh: that read and the table made of it are timed alone, through the UI's own client. Each figure
is the median of three after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
from streamlit.testing.v1 import AppTest

from obatch.client import Client
from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.server import serve_env, serving
from obatch.ui import views
from obatch.ui.session import CLIENT_KEY

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("completed", "failed", "expired", "cancelled")


def wait_final(api: Client, batch_id: str) -> None:
    while api.get_batch(batch_id).status not in FINAL:
        time.sleep(0.2)


def median_seconds(run: Callable[[], object], times: int = 4) -> float:
    """The median duration of ``run`` after a warm-up."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        took.append(time.perf_counter() - started)
    return statistics.median(took[1:])


def median_draw(draw: Callable[[], tuple[float, int]], times: int = 4) -> tuple[float, int]:
    """The median seconds of ``draw`` after a warm-up, and the ``/results`` pages its last run read."""
    runs = [draw() for _ in range(times)]
    return statistics.median(seconds for seconds, _ in runs[1:]), runs[-1][1]


class Counted(httpx.HTTPTransport):
    """The page's transport: counts the ``/results`` pages it asks for."""

    pages = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        Counted.pages += request.url.path.endswith("/results")
        return super().handle_request(request)


def page(url: str, batch_id: str, *, merged: bool | None = None, again: bool = False) -> tuple[float, int]:
    """One draw of the Batches page: the batch opened (``merged`` None), or, once it is open, its switch turned on
    (``again``: drawn once before); its seconds and the ``/results`` pages it read."""
    at = AppTest.from_file(str(ROOT / "pages/batches.py"), default_timeout=300)
    at.session_state[CLIENT_KEY] = Client(url, transport=Counted())
    at.run()
    at.selectbox(key="batch_pick").set_value(batch_id)
    if merged is not None:
        at.run()
        at.toggle(key=f"merged-{batch_id}").set_value(merged)
        if again:
            at.run()
    before, started = Counted.pages, time.perf_counter()
    at.run()
    took = time.perf_counter() - started
    assert not at.exception, at.exception
    return took, Counted.pages - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--error-rate", type=float, default=0.1)
    args = parser.parse_args()
    sim = OllamaSim(SimConfig(num_parallel=8, decode_tps=4000, default_output_tokens=4, error_rate=args.error_rate))
    _, stop = run_in_thread(sim=sim)
    data = Path(tempfile.mkdtemp(prefix="obatch-ui-merged-")) / "data"
    env = serve_env(data, backend="ollama", ollama_url=sim.url, max_attempts=1, concurrency=8)
    try:
        with serving(data, env, ready_within=60) as served, Client(served.url) as api:
            body = b"".join(orjson.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": "llama3.2:1b", "max_tokens": 4, "messages": [
                                              {"role": "user", "content": f"question {i}"}]}}) + b"\n"
                            for i in range(args.lines))
            first = api.create_batch(api.upload_file(body, "chain.jsonl").id, endpoint="/v1/chat/completions").id
            wait_final(api, first)
            sim.config.error_rate = 0.0
            retry = api.retry_batch(first).id
            wait_final(api, retry)

            def fetch(after: int, limit: int) -> tuple[bytes, int, bool]:
                got = api.batch_results(retry, after=after, limit=limit, merged=True)
                return got.raw, got.after, got.finished

            reread_pages = [0]

            def reread() -> None:
                read = views.read_more(views.RawResults(), fetch, final=True)
                views.merged_frame(read.raw, {}, retry)
                reread_pages[0] = read.pages

            url = served.url
            figures = {
                "the first batch opened (its own results read)": median_draw(lambda: page(url, first)),
                "switch on, first draw": median_draw(lambda: page(url, retry, merged=True)),
                "switch on, next draws": median_draw(lambda: page(url, retry, merged=True, again=True)),
            }
            retried = api.get_batch(retry).request_counts
            print(f"{args.lines:,} lines, {retried.total if retried else 0:,} of them retried")
            for what, (seconds, pages) in figures.items():
                print(f"  {what:<60} {seconds:6.2f} s  {pages:3d} /results page(s)")
            seconds = median_seconds(reread)
            print(f"  {'merged re-read + table (each refresh while a retry runs)':<60} {seconds:6.2f} s  "
                  f"{reread_pages[0]:3d} /results page(s)")
    finally:
        stop()


if __name__ == "__main__":
    main()
