"""How long each UI page takes to draw when the backend is hung (accepts connections, never answers), refused,
or the server itself is down: `python perf/ui_pages.py`.

Each page is run with Streamlit's AppTest against a real `obatch serve` (its own data dir) whose Ollama URL points
at the broken backend; the first run of each page is a warm-up (imports), the median of the next three is printed,
with the time of one `GET /health`.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from streamlit.testing.v1 import AppTest

from obatch.testing.server import free_port, serve_env, serving

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("streamlit_app.py", "pages/batches.py", "pages/models.py", "pages/benchmarks.py")


@contextmanager
def server(engine_url: str) -> Iterator[str]:
    data = Path(tempfile.mkdtemp(prefix="obatch-ui-pages-")) / "data"
    with serving(data, serve_env(data, backend="ollama", ollama_url=engine_url), ready_within=60) as served:
        yield served.url


def page_seconds(name: str, server_url: str) -> float:
    os.environ["OBATCH_SERVER_URL"] = server_url
    times = []
    for _ in range(4):
        at = AppTest.from_file(str(ROOT / name), default_timeout=120)
        started = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def report(label: str, server_url: str) -> None:
    started = time.perf_counter()
    try:
        httpx.get(f"{server_url}/health", timeout=30)
        health = f"{time.perf_counter() - started:.2f} s"
    except httpx.TransportError:
        health = "refused"
    pages = "  ".join(f"{name.removeprefix('pages/')} {page_seconds(name, server_url):.2f} s" for name in PAGES)
    print(f"{label:<16} /health {health:<8} {pages}", flush=True)


def main() -> None:
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel accepts; nothing answers
        with server(f"http://127.0.0.1:{hung.getsockname()[1]}") as url:
            report("backend hung", url)
    with server(f"http://127.0.0.1:{free_port()}") as url:
        report("backend refused", url)
    report("server down", f"http://127.0.0.1:{free_port()}")


if __name__ == "__main__":
    main()
