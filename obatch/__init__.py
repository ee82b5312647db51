"""obatch: run OpenAI Batch API files through local LLMs, durably and concurrently.

``await obatch.run(requests, model=..., concurrency=...)`` returns a polars DataFrame with one row per request.
Importing obatch starts nothing and imports no web or UI framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from obatch._lazy import lazy_names

if TYPE_CHECKING:
    from obatch.api import (
        RunReport,
        results,
        results_frame,
        results_sync,
        retry,
        retry_batch,
        retry_sync,
        run,
        run_batch_file,
        run_sync,
    )
    from obatch.config import Settings
    from obatch.errors import ObatchError

__all__ = ["ObatchError", "RunReport", "Settings", "results", "results_frame", "results_sync", "retry", "retry_batch",
           "retry_sync", "run", "run_batch_file", "run_sync"]
__version__ = "0.1.0"

# The public names load on first use (PEP 562): `obatch` on a command line should not pay for the notebook API.
_HOME = {"ObatchError": "obatch.errors", "Settings": "obatch.config", "RunReport": "obatch.api",
         "results_frame": "obatch.api", "run": "obatch.api", "run_batch_file": "obatch.api", "run_sync": "obatch.api",
         "results": "obatch.api", "results_sync": "obatch.api", "retry": "obatch.api", "retry_batch": "obatch.api",
         "retry_sync": "obatch.api"}
__getattr__ = lazy_names(__name__, _HOME, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
