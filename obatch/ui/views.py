"""Pure builders behind the UI pages: API answers → polars frames → altair charts. No Streamlit here.

Pages stay a description of the screen; everything worth testing (validation preview, progress and ETA, result
tables and their filters, benchmark charts) is a function of plain data, checked by unit tests and AppTest alike.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import altair as alt
import orjson
import polars as pl

from obatch import context
from obatch.errors import LineProblem
from obatch.jsonl import Limits, Request, iter_file
from obatch.protocol import FINAL_STATUSES, Batch

# ------------------------------------------------------------------------------------------ validation

PREVIEW_SCHEMA = {
    "line": pl.Int64, "status": pl.Utf8, "custom_id": pl.Utf8, "model": pl.Utf8, "code": pl.Utf8,
    "message": pl.Utf8, "text": pl.Utf8, "prompt_tokens": pl.Int64, "max_tokens": pl.Int64,
}
SNIPPET = 120


@dataclass
class Preview:
    """The local validation of an input file, before anything is sent: one row per non-blank line."""

    lines: pl.DataFrame
    file_problems: list[LineProblem] = field(default_factory=list)
    endpoint: str | None = None

    @property
    def n_requests(self) -> int:
        return int((self.lines["status"] == "ok").sum())

    @property
    def problems(self) -> pl.DataFrame:
        """Bad lines (and whole-file problems, with a null line) with their messages."""
        bad = self.lines.filter(pl.col("status") == "error").select("line", "code", "message", "text")
        whole = pl.DataFrame([{"line": None, "code": p.code, "message": p.message, "text": None}
                              for p in self.file_problems], schema=bad.schema)
        return pl.concat([whole, bad])

    @property
    def n_problems(self) -> int:
        return self.problems.height

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_requests > 0

    @property
    def models(self) -> list[str]:
        return sorted(m for m in self.lines.filter(pl.col("status") == "ok")["model"].unique().to_list() if m)

    def mean_tokens(self) -> tuple[int | None, int | None]:
        """Mean prompt-token estimate and mean requested output tokens of the valid lines (for the estimate)."""
        good = self.lines.filter(pl.col("status") == "ok")
        if good.is_empty():
            return None, None
        prompt = good["prompt_tokens"].mean()
        output = good["max_tokens"].mean()
        return (round(prompt) if isinstance(prompt, int | float) else None,
                round(output) if isinstance(output, int | float) else None)


def _snippet(value: str) -> str:
    value = " ".join(value.split())
    return value if len(value) <= SNIPPET else value[: SNIPPET - 1] + "…"


def _request_text(request: Request) -> str:
    body = request.body
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        content = last.get("content") if isinstance(last, dict) else last
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return _snippet(str(content))
    for key in ("prompt", "input"):
        if key in body:
            return _snippet(str(body[key]))
    return ""


def preview_file(data: bytes, *, model: str | None = None, endpoint: str | None = None,
                 limits: Limits | None = None) -> Preview:
    """Validate an uploaded file with the core's own parser, line by line, as the server will.

    ``model`` is the override the user picked (lines without ``body.model`` then pass). Without ``endpoint`` the
    batch endpoint is the first valid line's ``url`` (as the server decides), and lines that disagree are flagged.
    """
    raw_lines = list(io.BytesIO(data))
    items = list(iter_file(raw_lines, limits=limits, model=model, endpoint=endpoint))
    if endpoint is None:
        urls = [i.url for i in items if isinstance(i, Request)]
        if urls and len(set(urls)) > 1:
            endpoint = urls[0]
            items = list(iter_file(raw_lines, limits=limits, model=model, endpoint=endpoint))
        elif urls:
            endpoint = urls[0]
    rows: list[dict[str, Any]] = []
    file_problems: list[LineProblem] = []
    for item in items:
        if isinstance(item, Request):
            rows.append({"line": item.line, "status": "ok", "custom_id": item.custom_id, "model": item.model,
                         "code": None, "message": None, "text": _request_text(item),
                         "prompt_tokens": context.estimate_prompt_tokens(item.url, item.body),
                         "max_tokens": context.output_budget(item.body)})
        elif item.line is None:
            file_problems.append(item)
        else:
            raw = raw_lines[item.line - 1] if 0 < item.line <= len(raw_lines) else b""
            rows.append({"line": item.line, "status": "error", "custom_id": _custom_id_of(raw), "model": None,
                         "code": item.code, "message": item.message,
                         "text": _snippet(raw.decode("utf-8", "replace")), "prompt_tokens": None,
                         "max_tokens": None})
    frame = pl.DataFrame(rows, schema=PREVIEW_SCHEMA).sort("line")
    return Preview(frame, file_problems, endpoint)


def _custom_id_of(raw: bytes) -> str | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("custom_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def highlight_errors(frame: pl.DataFrame) -> Any:
    """A pandas Styler painting bad lines red (what ``st.dataframe`` shows as highlighted rows)."""
    pdf = frame.to_pandas()

    def paint(row: Any) -> list[str]:
        colour = "background-color: #fde2e1; color: #8a1c1c" if row["status"] == "error" else ""
        return [colour] * len(row)

    return pdf.style.apply(paint, axis=1)


# --------------------------------------------------------------------------------------------- batches

BATCH_SCHEMA: dict[str, Any] = {
    "id": pl.Utf8, "status": pl.Utf8, "progress": pl.Float64, "total": pl.Int64, "completed": pl.Int64,
    "failed": pl.Int64, "model": pl.Utf8, "created": pl.Datetime("ms"), "endpoint": pl.Utf8,
    "output_file_id": pl.Utf8, "error_file_id": pl.Utf8, "input_file_id": pl.Utf8,
}


def batches_frame(batches: Sequence[Batch]) -> pl.DataFrame:
    """The batch list table: one row per batch, newest first, with a 0..1 progress."""
    rows = []
    for b in batches:
        counts = b.request_counts
        total, completed, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
        rows.append({"id": b.id, "status": b.status, "model": b.model or "as in the file", "endpoint": b.endpoint,
                     "created": b.created_at * 1000, "total": total, "completed": completed, "failed": failed,
                     "progress": (completed + failed) / total if total else (1.0 if b.status == "completed" else 0.0),
                     "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
                     "input_file_id": b.input_file_id})
    return pl.DataFrame(rows, schema=BATCH_SCHEMA)


def is_final(batch: Batch) -> bool:
    return batch.status in FINAL_STATUSES


@dataclass
class BatchProgress:
    """What the progress panel shows. Rates count succeeded requests only; the ETA uses everything finished."""

    total: int
    completed: int
    failed: int
    elapsed_s: float | None
    requests_per_s: float | None
    tokens_per_s: float | None
    eta_s: float | None
    expected_s: float | None = None

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def _end_of(batch: Batch) -> int | None:
    for stamp in (batch.completed_at, batch.failed_at, batch.cancelled_at, batch.expired_at, batch.finalizing_at):
        if stamp:
            return stamp
    return None


def batch_progress(batch: Batch, *, now: float | None = None, estimate: Mapping[str, Any] | None = None
                   ) -> BatchProgress:
    """Counts, throughput and ETA of a batch; before the first result the ETA falls back to the estimate."""
    now = time.time() if now is None else now
    counts = batch.request_counts
    total, completed, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
    expected = estimate_seconds(estimate)[0] if estimate else None
    if not batch.in_progress_at:
        return BatchProgress(total, completed, failed, None, None, None, expected, expected)
    end = _end_of(batch) or now
    elapsed = max(0.0, end - batch.in_progress_at)
    rate = completed / elapsed if elapsed > 0 else None
    tokens = batch.usage.output_tokens if batch.usage else 0
    tps = tokens / elapsed if elapsed > 0 and tokens else None
    done = completed + failed
    eta: float | None
    if is_final(batch) or batch.status == "finalizing":
        eta = 0.0
    elif done and elapsed > 0:
        eta = (total - done) / (done / elapsed)
    elif expected is not None:
        eta = max(0.0, expected - elapsed)
    else:
        eta = None
    return BatchProgress(total, completed, failed, elapsed, rate, tps, eta, expected)


def format_seconds(seconds: float | None) -> str:
    """``93`` → ``1 min 33 s``; None → ``—``."""
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "< 1 s" if seconds < 0.1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def batch_errors_frame(batch: Batch) -> pl.DataFrame:
    """A failed batch's validation problems (OpenAI ``errors.data``)."""
    items = batch.errors.data if batch.errors else []
    return pl.DataFrame([{"line": e.line, "code": e.code, "message": e.message} for e in items],
                        schema={"line": pl.Int64, "code": pl.Utf8, "message": pl.Utf8})


# --------------------------------------------------------------------------------------------- results

RESULT_SCHEMA = {
    "custom_id": pl.Utf8, "status": pl.Utf8, "status_code": pl.Int64, "finish_reason": pl.Utf8,
    "content": pl.Utf8, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "latency_ms": pl.Float64,
    "error_code": pl.Utf8, "error_message": pl.Utf8,
}
_LATENCY_KEYS = ("latency_ms", "duration_ms", "total_ms")


def _latency(line: Mapping[str, Any], response: Mapping[str, Any], body: Mapping[str, Any]) -> float | None:
    """obatch may add a latency to an output line (top level, response or an ``obatch``/``timings`` object)."""
    for holder in (line, response, body, line.get("obatch") or {}, response.get("obatch") or {},
                   body.get("obatch") or {}, body.get("timings") or {}):
        if isinstance(holder, Mapping):
            for key in _LATENCY_KEYS:
                value = holder.get(key)
                if isinstance(value, int | float):
                    return float(value)
    return None


def _result_row(line: Mapping[str, Any]) -> dict[str, Any]:
    response = line.get("response") or {}
    body = response.get("body") or {} if isinstance(response, Mapping) else {}
    error = line.get("error") or (body.get("error") if isinstance(body.get("error"), Mapping) else None) or {}
    status_code = response.get("status_code") if isinstance(response, Mapping) else None
    ok = bool(response) and not line.get("error") and isinstance(status_code, int) and status_code < 400
    choices = body.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    message = first.get("message") or {}
    content = message.get("content") if isinstance(message, Mapping) else None
    if content is None:
        content = first.get("text")
    if content is None and body.get("data"):  # embeddings: show the vector size
        vector = body["data"][0].get("embedding") if isinstance(body["data"][0], Mapping) else None
        content = f"[embedding of {len(vector)} values]" if isinstance(vector, list) else None
    usage = body.get("usage") or {}
    return {
        "custom_id": line.get("custom_id"), "status": "succeeded" if ok else "failed",
        "status_code": status_code, "finish_reason": first.get("finish_reason"), "content": content,
        "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
        "latency_ms": _latency(line, response, body),
        "error_code": error.get("code") if isinstance(error, Mapping) else None,
        "error_message": error.get("message") if isinstance(error, Mapping) else None,
    }


def _jsonl(data: bytes | None) -> Iterable[Mapping[str, Any]]:
    for raw in io.BytesIO(data or b""):
        raw = raw.strip()
        if raw:
            value = orjson.loads(raw)
            if isinstance(value, Mapping):
                yield value


def results_frame(output: bytes | None, errors: bytes | None = None) -> pl.DataFrame:
    """Output and error files → one row per request (matched on ``custom_id``, sorted by it)."""
    rows = [_result_row(line) for data in (output, errors) for line in _jsonl(data)]
    return pl.DataFrame(rows, schema=RESULT_SCHEMA).sort("custom_id")


def filter_results(frame: pl.DataFrame, *, statuses: Sequence[str] | None = None,
                   finish_reasons: Sequence[str] | None = None,
                   latency_ms: tuple[float, float] | None = None) -> pl.DataFrame:
    """Rows matching every given filter (an empty or None filter keeps everything)."""
    if statuses:
        frame = frame.filter(pl.col("status").is_in(list(statuses)))
    if finish_reasons:
        frame = frame.filter(pl.col("finish_reason").is_in(list(finish_reasons)))
    if latency_ms is not None:
        low, high = latency_ms
        frame = frame.filter(pl.col("latency_ms").is_between(low, high))
    return frame


def options_of(frame: pl.DataFrame, column: str) -> list[str]:
    """The distinct non-null values of a column, sorted (for a filter's choices)."""
    return sorted(str(v) for v in frame[column].drop_nulls().unique().to_list())


# ------------------------------------------------------------------------------------------ benchmarks

BENCH_COLUMNS: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_id", "name"),
    "num_ctx": ("num_ctx", "context", "context_window", "n_ctx"),
    "concurrency": ("concurrency", "parallel", "num_parallel"),
    "tokens_per_s": ("tokens_per_s", "output_tps", "output_tokens_per_s", "tokens_per_second", "tps"),
    "requests_per_s": ("requests_per_s", "req_per_s", "requests_per_second", "rps"),
    "latency_p50_ms": ("latency_p50_ms", "latency_p50", "p50_latency_ms", "latency_ms_p50", "p50_ms"),
    "latency_p90_ms": ("latency_p90_ms", "latency_p90", "p90_latency_ms", "latency_ms_p90", "p90_ms"),
    "latency_p99_ms": ("latency_p99_ms", "latency_p99", "p99_latency_ms", "latency_ms_p99", "p99_ms"),
    "ttft_p50_ms": ("ttft_p50_ms", "ttft_p50", "p50_ttft_ms", "ttft_ms_p50"),
    "gen_tps": ("gen_tps", "decode_tps"),
    "success_rate": ("success_rate",),
    "num_requests": ("num_requests", "n_requests", "requests"),
    "run_id": ("run_id",),
    "excluded": ("excluded",),
    "backend": ("backend",),
    "created_at": ("created_at", "measured_at", "timestamp", "finished_at"),
}
BENCH_SCHEMA = {
    "model": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64, "tokens_per_s": pl.Float64,
    "requests_per_s": pl.Float64, "latency_p50_ms": pl.Float64, "latency_p90_ms": pl.Float64,
    "latency_p99_ms": pl.Float64, "ttft_p50_ms": pl.Float64, "gen_tps": pl.Float64, "success_rate": pl.Float64,
    "num_requests": pl.Int64, "run_id": pl.Utf8, "backend": pl.Utf8, "created_at": pl.Float64, "excluded": pl.Boolean,
}
METRIC_TITLES = {
    "tokens_per_s": "output tokens / s", "requests_per_s": "requests / s", "latency_p50_ms": "p50 latency (ms)",
    "latency_p90_ms": "p90 latency (ms)", "latency_p99_ms": "p99 latency (ms)", "ttft_p50_ms": "p50 TTFT (ms)",
    "gen_tps": "decode tokens / s per request",
}
PERCENTILES = {"latency_p50_ms": "p50", "latency_p90_ms": "p90", "latency_p99_ms": "p99"}


def _flatten(point: Mapping[str, Any]) -> dict[str, Any]:
    """Nested ``{config: {...}, metrics: {...}}`` objects → one flat dict (inner keys win over nothing)."""
    flat: dict[str, Any] = {}
    for key, value in point.items():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                flat.setdefault(inner, inner_value)
        else:
            flat[key] = value
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def bench_frame(points: Iterable[Mapping[str, Any]], *, model: str | None = None) -> pl.DataFrame:
    """Benchmark points (any of the API's spellings) → one tidy frame with ``BENCH_SCHEMA``."""
    rows = []
    for point in points:
        flat = _flatten(point)
        row: dict[str, Any] = {}
        for column, names in BENCH_COLUMNS.items():
            value = next((flat[n] for n in names if flat.get(n) is not None), None)
            if BENCH_SCHEMA[column] == pl.Boolean:
                row[column] = value is True  # a point's flag (a summary row's count of excluded repeats is not)
            elif BENCH_SCHEMA[column] == pl.Utf8:
                row[column] = None if value is None else str(value)
            elif BENCH_SCHEMA[column] == pl.Int64:
                number = _number(value)
                row[column] = None if number is None else round(number)
            else:
                row[column] = _number(value)
        if row["model"] is None:
            row["model"] = model
        rows.append(row)
    return pl.DataFrame(rows, schema=BENCH_SCHEMA)


def latest_points(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per (model, num_ctx, concurrency): the mean over the repeats of its newest run, leaving out points
    marked ``excluded`` (too many failures to count as a speed)."""
    config = ["model", "num_ctx", "concurrency"]
    frame = frame.filter(~pl.col("excluded").fill_null(False))
    if frame.is_empty():
        return frame
    keyed = frame.with_columns(
        pl.coalesce(pl.col("run_id"), pl.col("created_at").cast(pl.Utf8), pl.lit("")).alias("_run"))
    newest = keyed.sort("created_at", nulls_last=False).group_by(config).agg(pl.col("_run").last().alias("_newest"))
    kept = keyed.join(newest, on=config, nulls_equal=True).filter(pl.col("_run") == pl.col("_newest"))
    numeric = [c for c, t in BENCH_SCHEMA.items() if t == pl.Float64 and c != "created_at"]
    return (kept.group_by(config, maintain_order=True)
            .agg(*[pl.col(c).mean() for c in numeric], pl.col("num_requests").sum(), pl.col("run_id").last(),
                 pl.col("backend").last(), pl.col("created_at").max(), pl.col("excluded").any())
            .select(list(BENCH_SCHEMA)).sort(config))


def best_per(frame: pl.DataFrame, x: str, *, metric: str = "tokens_per_s") -> pl.DataFrame:
    """For each (model, ``x``) keep the row with the highest ``metric`` (e.g. the best concurrency per context)."""
    if frame.is_empty():
        return frame
    return (frame.sort(metric, nulls_last=False)
            .unique(subset=["model", x], keep="last", maintain_order=True).sort("model", x))


def along(frame: pl.DataFrame, x: str, *, fixed: str, value: int | None) -> pl.DataFrame:
    """The curve along ``x`` (num_ctx or concurrency) with the other knob at ``value`` (None: its best)."""
    frame = latest_points(frame).filter(pl.col(x).is_not_null())
    if value is not None:
        return frame.filter(pl.col(fixed) == value).sort("model", x)
    return best_per(frame, x)


def _x_axis(x: str) -> alt.X:
    """Windows and concurrency levels double: an ordinal axis spaces them evenly and labels each measured one."""
    title = {"num_ctx": "context window (num_ctx, tokens)", "concurrency": "concurrency (requests in flight)"}[x]
    return alt.X(f"{x}:O", title=title, sort="ascending", axis=alt.Axis(labelAngle=0))


def _model_colour(**kwargs: Any) -> alt.Color:
    """One clearly different colour per model (Streamlit's theme would shade them all blue)."""
    return alt.Color("model:N", title="model", scale=alt.Scale(scheme="tableau10"), **kwargs)


def metric_chart(frame: pl.DataFrame, x: str, metric: str) -> alt.Chart:
    """One line per model: ``metric`` against ``x`` (log₂ axis, since windows and concurrency double)."""
    data = frame.select("model", "num_ctx", "concurrency", metric).drop_nulls([x, metric]).sort("model", x)
    chart: alt.Chart = (alt.Chart(data, title=f"{METRIC_TITLES[metric]} vs {x}")
            .mark_line(point=True)
            .encode(x=_x_axis(x), y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric]),
                    color=_model_colour(),
                    tooltip=["model:N", "num_ctx:Q", "concurrency:Q", alt.Tooltip(f"{metric}:Q", format=".2f")]))
    return chart


def latency_chart(frame: pl.DataFrame, x: str) -> alt.Chart:
    """Latency percentiles against ``x``: colour is the model, dash is the percentile."""
    present = [c for c in PERCENTILES if frame[c].drop_nulls().len() > 0]
    long = (frame.select("model", "num_ctx", "concurrency", *present)
            .unpivot(index=["model", "num_ctx", "concurrency"], on=present, variable_name="percentile",
                     value_name="latency_ms")
            .with_columns(pl.col("percentile").replace_strict(PERCENTILES, default=None))
            .drop_nulls([x, "latency_ms"]).sort("model", "percentile", x)) if present else pl.DataFrame(
                schema={"model": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64, "percentile": pl.Utf8,
                        "latency_ms": pl.Float64})
    chart: alt.Chart = (alt.Chart(long, title=f"latency percentiles vs {x}")
            .mark_line(point=True)
            .encode(x=_x_axis(x), y=alt.Y("latency_ms:Q", title="latency (ms)"),
                    color=_model_colour(),
                    strokeDash=alt.StrokeDash("percentile:N", title="percentile", sort=list(PERCENTILES.values())),
                    tooltip=["model:N", "percentile:N", "num_ctx:Q", "concurrency:Q",
                             alt.Tooltip("latency_ms:Q", format=".0f")]))
    return chart


def compare_chart(frame: pl.DataFrame, metric: str = "tokens_per_s") -> alt.Chart:
    """Models side by side at their best configuration (bars), labelled with that configuration."""
    data = best_per(latest_points(frame), "model", metric=metric).with_columns(
        config=pl.format("ctx {} · c {}", pl.col("num_ctx"), pl.col("concurrency")))
    chart: alt.Chart = (alt.Chart(data, title=f"best {METRIC_TITLES[metric]} per model")
            .mark_bar()
            .encode(x=alt.X(f"{metric}:Q", title=METRIC_TITLES[metric]), y=alt.Y("model:N", sort="-x"),
                    color=_model_colour(legend=None),
                    tooltip=["model:N", "config:N", alt.Tooltip(f"{metric}:Q", format=".2f")]))
    return chart


def best_table(frame: pl.DataFrame) -> pl.DataFrame:
    """The "best known configuration" table: the columns a person compares, rounded."""
    columns = ["model", "backend", "num_ctx", "concurrency", "tokens_per_s", "requests_per_s", "latency_p50_ms",
               "latency_p99_ms", "ttft_p50_ms", "success_rate"]
    return frame.select(columns).with_columns(pl.col(pl.Float64).round(2)).sort("model")


# ------------------------------------------------------------------------------------------- estimates

_EXPECTED = ("expected_seconds", "seconds", "duration_s", "expected_s", "estimate_seconds", "eta_seconds")
_LOW = ("low_seconds", "lower_seconds", "min_seconds", "low_s", "low")
_HIGH = ("high_seconds", "upper_seconds", "max_seconds", "high_s", "high")


def estimate_seconds(estimate: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(expected, low, high) seconds of an estimate answer, whichever spelling it uses."""
    if not estimate:
        return None, None, None
    flat = _flatten(estimate)
    interval = estimate.get("interval") or estimate.get("interval_seconds")

    def pick(names: Sequence[str]) -> float | None:
        return next((n for n in (_number(flat.get(k)) for k in names) if n is not None), None)

    low, high = pick(_LOW), pick(_HIGH)
    if isinstance(interval, Sequence) and not isinstance(interval, str) and len(interval) == 2:
        low, high = _number(interval[0]), _number(interval[1])
    return pick(_EXPECTED), low, high


def estimate_config(estimate: Mapping[str, Any] | None) -> str | None:
    """``num_ctx 4096 · concurrency 4``: the configuration an estimate assumes (None when it does not say)."""
    if not estimate or estimate.get("num_ctx") is None or estimate.get("concurrency") is None:
        return None
    return f"num_ctx {estimate['num_ctx']} · concurrency {estimate['concurrency']}"


def describe_estimate(estimate: Mapping[str, Any] | None) -> str | None:
    """One sentence: ``about 2 min 10 s (1 min 50 s – 2 min 40 s)``, or None without an expected duration."""
    expected, low, high = estimate_seconds(estimate)
    if expected is None:
        return None
    interval = f" ({format_seconds(low)} – {format_seconds(high)})" if low is not None and high is not None else ""
    return f"about {format_seconds(expected)}{interval}"


ESTIMATE_RECORD_SCHEMA: dict[str, Any] = {
    "batch_id": pl.Utf8, "models": pl.Utf8, "requests": pl.Int64, "concurrency": pl.Int64,
    "estimated_seconds": pl.Float64, "low": pl.Float64, "high": pl.Float64, "actual_seconds": pl.Float64,
    "error_pct": pl.Float64, "within_interval": pl.Boolean,
}


def estimate_record_frame(records: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Past batches' estimated vs actual durations (the bench store's ``estimates`` view, as the API sends it)."""
    rows = []
    for record in records:
        flat = _flatten(record)
        expected, low, high = estimate_seconds({**flat, "seconds": flat.get("estimated_seconds",
                                                                          flat.get("seconds"))})
        actual = next((v for v in (_number(flat.get(k)) for k in ("actual_seconds", "actual_s", "actual"))
                       if v is not None), None)
        error = _number(flat.get("error_pct"))
        if error is None and actual and expected:
            error = 100.0 * (expected - actual) / actual
        within = flat.get("within_interval")
        if within is None and None not in (actual, low, high):
            within = low <= actual <= high  # type: ignore[operator]
        models = flat.get("models") or flat.get("model")
        rows.append({"batch_id": flat.get("batch_id") or flat.get("id"),
                     "models": ",".join(models) if isinstance(models, list) else models,
                     "requests": _int(flat.get("requests") or flat.get("num_requests")),
                     "concurrency": _int(flat.get("concurrency")), "estimated_seconds": expected, "low": low,
                     "high": high, "actual_seconds": actual, "error_pct": error,
                     "within_interval": None if within is None else bool(within)})
    return pl.DataFrame(rows, schema=ESTIMATE_RECORD_SCHEMA)


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else round(number)


def estimate_record_chart(frame: pl.DataFrame) -> alt.TopLevelMixin:
    """The report notebook's estimate-vs-actual chart (``obatch.bench.charts``), on the API's records."""
    from obatch.bench.charts import estimate_vs_actual

    return estimate_vs_actual(frame)


def models_frame(models: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """``/v1/models`` entries → the Models page table."""
    keys = ("id", "loaded", "context_length", "loaded_context_length", "parameter_size", "quantization", "family")
    schema = {"id": pl.Utf8, "loaded": pl.Boolean, "context_length": pl.Int64, "loaded_context_length": pl.Int64,
              "parameter_size": pl.Utf8, "quantization": pl.Utf8, "family": pl.Utf8}
    rows = []
    for entry in models:
        flat = _flatten(entry)
        row: dict[str, Any] = {k: flat.get(k) for k in keys}
        row["loaded"] = bool(row["loaded"]) if row["loaded"] is not None else None
        for k in ("context_length", "loaded_context_length"):
            number = _number(row[k])
            row[k] = None if number is None else round(number)
        for k in ("id", "parameter_size", "quantization", "family"):
            row[k] = None if row[k] is None else str(row[k])
        rows.append(row)
    return pl.DataFrame(rows, schema=schema)


@dataclass
class Health:
    """The server's ``/health`` answer, read generously: server up? backend reachable? which backend?"""

    server_ok: bool
    backend: str | None = None
    backend_ok: bool | None = None
    backend_url: str | None = None
    detail: str | None = None
    version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _truthy_status(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.lower() in ("ok", "up", "healthy", "pass", "ready", "reachable")
    return None


def read_health(body: Mapping[str, Any]) -> Health:
    backend = body.get("backend")
    name = url = detail = version = None
    backend_ok: bool | None = None
    if isinstance(backend, Mapping):
        name = backend.get("name") or backend.get("kind") or backend.get("type")
        url = backend.get("url") or backend.get("base_url")
        backend_ok = _truthy_status(backend.get("ok", backend.get("reachable", backend.get("status"))))
        detail = backend.get("error") or backend.get("detail") or backend.get("message")
        version = backend.get("version")
    elif isinstance(backend, str):
        name = backend
    if backend_ok is None:
        backend_ok = _truthy_status(body.get("backend_ok", body.get("backend_status")))
    http_status = body.get("http_status", 200)
    status = str(body.get("status", "ok")).lower()
    server_ok = isinstance(http_status, int) and http_status < 500 and status not in ("error", "unavailable", "down")
    if status == "degraded" and backend_ok is None:
        backend_ok = False  # obatch's /health: the store answers, the backend does not
    if backend_ok is None and not server_ok:
        backend_ok = False
    detail = detail or body.get("error") or body.get("detail")
    return Health(server_ok=server_ok, backend=str(name) if name else None, backend_ok=backend_ok,
                  backend_url=str(url) if url else None, detail=str(detail) if detail else None,
                  version=str(version) if version else None, raw=dict(body))


def most_common(values: Iterable[str]) -> str | None:
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else None
