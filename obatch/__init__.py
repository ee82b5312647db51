"""obatch: run OpenAI Batch API files through local LLMs, durably and concurrently.

``await obatch.run(requests, model=..., concurrency=...)`` returns a polars DataFrame with one row per request.
Importing obatch starts nothing and imports no web or UI framework.
"""

from obatch.api import RunReport, results_frame, run, run_batch_file, run_sync
from obatch.config import Settings
from obatch.errors import ObatchError

__all__ = ["ObatchError", "RunReport", "Settings", "results_frame", "run", "run_batch_file", "run_sync"]
__version__ = "0.1.0"
