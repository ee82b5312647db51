"""Pure builders behind the UI pages: API answers → polars frames → altair charts. No Streamlit here.

Pages stay a description of the screen; everything worth testing (validation preview, progress and ETA, result
tables and their filters, benchmark charts) is a function of plain data, checked by unit tests and AppTest alike.
One module per subject; the pages use them through this package (``views.preview_file``).
"""

from obatch.api import RESULT_SCHEMA
from obatch.protocol import FINAL_STATUSES
from obatch.ui.views._values import options_of
from obatch.ui.views.batches import (
    BATCH_SCHEMA,
    MODELS_KEY,
    BatchProgress,
    batch_errors_frame,
    batch_progress,
    batches_frame,
    concurrency_text,
    is_final,
    level_history_frame,
    model_of,
    not_run,
    picked_row,
    run_hosts_frame,
)
from obatch.ui.views.benchmarks import (
    BEST_FORMATS,
    CONFIG_COLUMNS,
    METRIC_TITLES,
    PERCENTILES,
    POINT_COLUMNS,
    RATE_FORMATS,
    along,
    best_table,
    capacity_table,
    compare_chart,
    configs_frame,
    goodput_table,
    latency_chart,
    latest_points,
    metric_chart,
    pareto_chart,
    points_frame,
    rate_points,
    slo_text,
)
from obatch.ui.views.estimates import (
    ESTIMATE_RECORD_SCHEMA,
    DeadlineView,
    deadline_view,
    describe_estimate,
    estimate_config,
    estimate_record_chart,
    estimate_record_frame,
    estimate_seconds,
    format_seconds,
    format_window,
    is_guess,
)
from obatch.ui.views.preview import PREVIEW_SCHEMA, Preview, highlight_errors, preview_file
from obatch.ui.views.results import (
    STATUSES,
    expand_ranges,
    filter_results,
    for_display,
    in_user_lines,
    latency_bounds,
    line_ranges,
    request_prompt,
    results_frame,
    row_facts,
)
from obatch.ui.views.runs import (
    PROVENANCE_SCHEMA,
    LiveResults,
    offers_retry,
    parent_of,
    provenance_frame,
    read_more,
    retries_of,
    retryable,
    reuse_text,
)
from obatch.ui.views.server import models_frame
from obatch.ui.views.tables import BLANK, blanks, written_as_text

__all__ = [
    "BATCH_SCHEMA",
    "BEST_FORMATS",
    "BLANK",
    "CONFIG_COLUMNS",
    "ESTIMATE_RECORD_SCHEMA",
    "FINAL_STATUSES",
    "METRIC_TITLES",
    "MODELS_KEY",
    "PERCENTILES",
    "POINT_COLUMNS",
    "PREVIEW_SCHEMA",
    "RATE_FORMATS",
    "RESULT_SCHEMA",
    "STATUSES",
    "BatchProgress",
    "Preview",
    "along",
    "batch_errors_frame",
    "batch_progress",
    "batches_frame",
    "best_table",
    "blanks",
    "capacity_table",
    "compare_chart",
    "concurrency_text",
    "configs_frame",
    "describe_estimate",
    "estimate_config",
    "estimate_record_chart",
    "estimate_record_frame",
    "estimate_seconds",
    "expand_ranges",
    "filter_results",
    "for_display",
    "format_seconds",
    "goodput_table",
    "highlight_errors",
    "in_user_lines",
    "is_final",
    "latency_bounds",
    "latency_chart",
    "latest_points",
    "level_history_frame",
    "line_ranges",
    "metric_chart",
    "model_of",
    "models_frame",
    "not_run",
    "options_of",
    "pareto_chart",
    "picked_row",
    "points_frame",
    "preview_file",
    "rate_points",
    "request_prompt",
    "results_frame",
    "row_facts",
    "run_hosts_frame",
    "slo_text",
    "written_as_text",
]

from obatch.ui.views.chains import FROM, RawResults, chain_of, line_ids, merged_frame, merged_summary
from obatch.ui.views.estimates import PILOT, estimate_notes, offers_pilot

__all__ += ["PILOT", "estimate_notes", "offers_pilot"]
__all__ += ["PROVENANCE_SCHEMA", "LiveResults", "offers_retry", "parent_of", "provenance_frame", "read_more",
            "retries_of", "retryable", "reuse_text"]
__all__ += ["DeadlineView", "deadline_view", "format_window", "is_guess"]

__all__ += ["FROM", "RawResults", "chain_of", "line_ids", "merged_frame", "merged_summary"]
