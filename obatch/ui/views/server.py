"""The Models page: the backend's models as a table (the health answer is drawn from ``protocol.Health`` as is)."""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from obatch.protocol import Model

MODEL_COLUMNS = {"id": pl.Utf8, "loaded": pl.Boolean, "context_length": pl.Int64, "loaded_context_length": pl.Int64,
                 "parameter_size": pl.Utf8, "quantization": pl.Utf8, "family": pl.Utf8}


def models_frame(models: Iterable[Model]) -> pl.DataFrame:
    """``/v1/models`` entries → the Models page table."""
    return pl.DataFrame([{k: getattr(m, k) for k in MODEL_COLUMNS} for m in models], schema=MODEL_COLUMNS)
