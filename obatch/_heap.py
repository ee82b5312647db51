"""Keeping the cyclic garbage collector off the hot path of a long-running process."""

from __future__ import annotations

import gc


def settle() -> None:
    """Exempt what is alive now from every later collection (``gc.freeze``): call it once start-up is done.

    What a process builds at start-up (modules, the web app and its schema, the store's mappers, the services) lives
    as long as the process, yet each full collection walked all of it again, holding the interpreter lock: on a busy
    server 0.1–0.8 s at a time, and every API request (and the batches' thread) waited behind it — the slowest
    percentile of ``perf/responsiveness.py``. After this, a full collection walks only what was made since.
    """
    gc.collect()
    gc.freeze()
