"""OpenAI wire models, with OpenAI's exact field names (openai-python ``types/batch*.py``, ``file_object.py``).

These are what crosses a boundary: batch input/output lines, File and Batch objects, error bodies. Database rows
live in ``obatch.store`` and are converted to these, never returned as they are.
"""

from __future__ import annotations

import os
import random
from typing import Any, Literal, get_args

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

Endpoint = Literal["/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)  # the batch endpoints obatch serves, in this order
# The field each endpoint cannot run without (OpenAI's own required body fields).
REQUIRED_BODY_FIELD: dict[str, str] = {"/v1/responses": "input", "/v1/chat/completions": "messages",
                                       "/v1/embeddings": "input", "/v1/completions": "prompt"}
# Batch endpoints OpenAI accepts that a local text model cannot serve: refused by name, never with a generic error.
UNSERVABLE_ENDPOINTS: tuple[str, ...] = ("/v1/moderations", "/v1/images/generations", "/v1/images/edits",
                                         "/v1/videos")


def endpoint_problem(endpoint: object) -> str | None:
    """Why ``endpoint`` cannot be a batch endpoint here (None when it can): names it and what obatch serves."""
    if endpoint in ENDPOINTS:
        return None
    supported = ", ".join(ENDPOINTS)
    if endpoint in UNSERVABLE_ENDPOINTS:
        return (f"{endpoint} is a batch endpoint at OpenAI, but local models cannot serve it; obatch supports "
                f"{supported}.")
    return f"endpoint must be one of {supported}; got {endpoint!r}."

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
# The error code of each line that never ran, by the final status that stopped the batch (OpenAI's codes).
NOT_RUN_CODES: dict[str, str] = {"expired": "batch_expired", "cancelled": "batch_cancelled"}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


class ResponseBody(_Wire):
    """``body`` is a dict when a line is read. When obatch writes a line from the store it is the stored JSON text
    as an ``orjson.Fragment``: a million-line output file is written without parsing every response again."""

    status_code: int
    request_id: str
    body: dict[str, Any] | InstanceOf[orjson.Fragment]


class LineError(_Wire):
    code: str | None
    message: str | None


class CachedFrom(_Wire):
    """The earlier line whose stored answer a line took instead of asking the engine (``obatch.cache``)."""

    batch_id: str
    custom_id: str


class LineStats(_Wire):
    """What obatch measured for a line, beside OpenAI's fields (clients that do not know ``obatch`` ignore it)."""

    line: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    attempts: int | None = None
    num_ctx: int | None = None
    loaded_context: int | None = None  # the context the engine really ran with, where it tells (Ollama's /api/ps)
    truncated: bool | None = None
    # Provenance: the engine host that answered, its engine and version, and the model's digest there (the batch's
    # ``obatch.engines`` entry, joined in), the request's seed, and answers the structured-output check refused.
    host: str | None = None
    engine: str | None = None
    engine_version: str | None = None
    model_digest: str | None = None
    seed: int | None = None
    refused_answers: int | None = None
    cached_from: CachedFrom | None = None


class OutputLine(_Wire):
    """One line of an output or error file: a ``response``, an ``error``, or both (an engine's error answer)."""

    id: str
    custom_id: str
    response: ResponseBody | None = None
    error: LineError | None = None
    obatch: LineStats | None = None

    def to_jsonl(self) -> bytes:
        """The line as written to a file. orjson writes the validated fields as they stand (these models have no
        aliases or serializers) and passes a raw response body through unparsed: a third of the cost of
        ``model_dump`` on the million-line path."""
        return orjson.dumps(self, default=_fields, option=orjson.OPT_APPEND_NEWLINE)


def _fields(value: Any) -> dict[str, Any]:
    """orjson's ``default`` for a nested model: its fields, then any extra ones."""
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__
        return {**value.__dict__, **extra} if extra else value.__dict__
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _without(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``data`` without those of ``names`` that are None: fields OpenAI's document marks optional but never null
    are left out rather than sent as null (tests/test_openai_schema.py checks the bodies against it)."""
    return {k: v for k, v in data.items() if v is not None or k not in names}


class FileObject(_Wire):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @model_serializer(mode="wrap")
    def _optional(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(handler(self), ("expires_at", "status_details"))


class BatchErrorItem(_Wire):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(_Wire):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem] = Field(default_factory=list)


class RequestCounts(_Wire):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(_Wire):
    cached_tokens: int = 0


class OutputTokensDetails(_Wire):
    reasoning_tokens: int = 0


class BatchUsage(_Wire):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(_Wire):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    status: BatchStatus
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None
    # obatch's own, beside OpenAI's fields (clients that do not know it ignore it)
    obatch: BatchExtension | None = None

    @model_serializer(mode="wrap")
    def _optional(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(handler(self), ("model",))


class HostStatus(_Wire):
    """One engine host of a pool as ``/health`` reports it (obatch's own shape): its state, its concurrency level
    (``best`` is the level auto believes best while a probe is under way) and the reason for it."""

    url: str
    backend: str
    state: Literal["up", "down"]
    concurrency: int
    best: int
    auto: bool
    reason: str
    in_flight: int = 0
    served: int = 0
    error: str | None = None
    models: list[str] | None = None


class BackendHealth(_Wire):
    """The backend part of ``/health``: the engine's name, whether it answered the last probe (with its version,
    or what went wrong in words a person can act on), its addresses and each host as the batches see it."""

    name: str
    reachable: bool
    version: str | None = None
    error: str | None = None
    urls: list[str] = Field(default_factory=list)
    hosts: list[HostStatus] = Field(default_factory=list)


class Health(_Wire):
    """``/health`` (obatch's own shape): ``ok``, or ``degraded`` while the backend does not answer (both with
    HTTP 200: batches wait for an engine that is still starting), or ``error`` with HTTP 503 when the store does
    not answer (``db`` says why)."""

    status: Literal["ok", "degraded", "error"]
    db: str
    backend: BackendHealth

    @property
    def server_ok(self) -> bool:
        return self.status != "error"


class Model(_Wire):
    """A ``/v1/models`` entry: OpenAI's Model (``id``, ``object``, ``created``, ``owned_by``) plus the engine's
    facts obatch adds beside them (clients that do not know them ignore them). The context lengths are what the
    engine reports: the trained maximum, and the window a loaded model runs with."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "obatch"
    context_length: int | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    loaded: bool = False
    loaded_context_length: int | None = None


class ModelList(_Wire):
    """``GET /v1/models``: OpenAI's list of models (no paging)."""

    object: Literal["list"] = "list"
    data: list[Model]


class EstimateCandidate(_Wire):
    """A configuration an estimate considered: its predicted duration and rate for this workload, beside the rates
    its stored points measured on their own (benchmark) workload."""

    num_ctx: int
    concurrency: int
    seconds: float
    req_per_s: float | None = None  # predicted for this workload
    measured_req_per_s: float | None = None  # what the benchmark measured at this configuration
    measured_output_tokens_per_s: float | None = None


class DeadlineOption(_Wire):
    """A configuration expected to meet a batch's window: a num_ctx and concurrency the sweep measured, on
    ``hosts`` hosts like the one estimated (the lines split evenly across them), and its expected duration."""

    num_ctx: int | None = None
    concurrency: int | None = None
    hosts: int = 1
    seconds: float


class DeadlinePlan(_Wire):
    """The estimate against a batch's ``completion_window`` (obatch's): whether the batch is expected to miss it
    and by how much (``miss_seconds``: the estimate past the window), whether even the estimate's lower bound is
    past it (``certain_miss``: ``--strict-window`` refuses such a batch), the configurations the sweep measured that
    would meet it (``meets``, fastest first) and the whole of it in words (``message``). Without an estimate (no
    benchmark points) ``seconds`` is None and ``message`` says why."""

    window_seconds: float
    seconds: float | None = None
    low: float | None = None
    high: float | None = None
    expected_miss: bool = False
    certain_miss: bool = False
    miss_seconds: float = 0.0
    meets: list[DeadlineOption] = Field(default_factory=list)
    message: str


class EstimatePoint(_Wire):
    """A stored benchmark point an estimate rests on."""

    id: int
    run_id: str
    num_ctx: int
    concurrency: int


class AnswerLengthsInfo(_Wire):
    """Where an estimate took its answer lengths from (``obatch.bench.answers``)."""

    source: Literal["pilot", "batches", "benchmarks", "none"] = "none"
    known: bool = False
    samples: int = 0
    cut: int = 0  # of the samples, answers a cap or the context cut (they tell a lower bound)
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    mean_cv: float = 0.0  # how far a new file's mean answer may lie from the learnt one (relative, one sigma)
    groups: int = 0
    endpoint: str | None = None
    open_ended: bool | None = None


class PilotInfo(_Wire):
    """The pilot behind an estimate: lines of the file run ahead of the batch (it takes them as finished)."""

    requests: int
    ran: int = 0
    reused: int = 0  # lines an earlier pilot of the same file had run
    failed: int = 0
    seconds: float = 0.0
    concurrency: int | None = None
    file_sha256: str | None = None
    lines: int | None = None  # valid lines of the file
    auto: bool = False  # an automatic pilot: it grew until its answers left the estimate sure enough


class DurationEstimate(_Wire):
    """``GET /v1/benchmarks/estimate``: how long a workload will take, with its interval (never below zero, and
    around the expected duration), the configuration it is for, the best one, the stored points it rests on and
    what the answer lengths were taken from. A file of several models has one estimate per model in ``groups``
    and their totals at the top."""

    object: Literal["benchmark.estimate"] = "benchmark.estimate"
    model: str
    backend: str | None = None
    num_requests: int
    prompt_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    seconds: float
    low: float
    high: float
    load_seconds: float = 0.0
    num_ctx: int | None = None
    concurrency: int | None = None
    req_per_s: float | None = None  # predicted for this workload
    measured_req_per_s: float | None = None  # what the points it rests on measured, on the benchmark's workload
    best: EstimateCandidate | None = None
    candidates: list[EstimateCandidate] = Field(default_factory=list)
    points: list[EstimatePoint] = Field(default_factory=list)
    method: str | None = None
    guess: bool = False  # answer lengths unknown: ``seconds`` is a guess, the interval spans what the model could do
    history_factor: float = 1.0
    history_batches: int = 0
    notes: list[str] = Field(default_factory=list)
    answers: AnswerLengthsInfo | None = None
    pilot: PilotInfo | None = None
    done_requests: int = 0  # lines a pilot already ran: the batch takes them as finished
    groups: list[DurationEstimate] | None = None
    made_at: float | None = None  # Unix time; set on the estimate a batch made at its start
    output_share: float | None = None  # how the running time scales with the answers' length (d log t / d log O)
    cached_prompt_tokens: float | None = None  # prompt tokens expected from the engine's prefix cache (a file's)
    schedule: str | None = None  # the order replayed: "auto" (obatch.schedule's) or "file"
    deadline: DeadlinePlan | None = None  # asked with a completion_window: whether the estimate meets it

    @classmethod
    def of_groups(cls, parts: list[DurationEstimate], **extra: Any) -> DurationEstimate:
        """One answer for a file: the estimate itself for one model; for several, their totals and each in
        ``groups``. ``extra`` fields (``pilot``, ``made_at``) go to the answer."""
        if len(parts) == 1:
            return parts[0].model_copy(update=extra)
        return cls(model=",".join(p.model for p in parts), backend=parts[0].backend,
                   num_requests=sum(p.num_requests for p in parts), seconds=sum(p.seconds for p in parts),
                   low=sum(p.low for p in parts), high=sum(p.high for p in parts),
                   load_seconds=sum(p.load_seconds for p in parts), done_requests=sum(p.done_requests for p in parts),
                   guess=any(p.guess for p in parts), notes=[n for p in parts for n in p.notes], groups=parts, **extra)

    @classmethod
    def stored(cls, text: str) -> DurationEstimate | None:
        """The estimate a batch made at its start, from what it keeps (``BatchRow.estimate_json``: each model
        group's estimate, when it was made)."""
        made = orjson.loads(text)
        try:
            groups = [cls.model_validate(g) for g in made.get("groups") or []]
        except ValueError:  # advice kept by an older version: the batch is shown without it
            return None
        return cls.of_groups(groups, made_at=made.get("made_at")) if groups else None

    @model_validator(mode="after")
    def _honest_interval(self) -> DurationEstimate:
        slack = 1e-6 * max(1.0, self.high)
        if not (0 <= self.low <= self.seconds + slack and self.seconds <= self.high + slack):
            raise ValueError(f"an estimate's interval must hold it and stay at or above zero: {self.low} ≤ "
                             f"{self.seconds} ≤ {self.high}")
        return self


class BatchEta(_Wire):
    """A running batch's remaining time, refined from the lines already finished (``obatch.progress.LiveEta``):
    ``seconds_left`` as of ``at`` (Unix time). ``waiting``: no engine host answers, the estimate is paused; the
    outages so far (``outage_seconds``) are left out of the throughput. ``concurrency``: the level the run settled
    on, the start estimate rescaled to it."""

    seconds_left: float | None = None
    at: float
    lines_done: int = 0
    lines_left: int = 0
    tokens_done: float = 0.0
    tokens_left: float = 0.0
    tokens_per_s: float | None = None
    waiting: bool = False
    concurrency: int | None = None
    outage_seconds: float = 0.0


class EngineEntry(_Wire):
    """An engine host a batch ran on: its URL, engine and version, and each model's digest there."""

    host: str
    engine: str
    version: str | None = None
    models: dict[str, str | None] = Field(default_factory=dict)


class BatchExtension(_Wire):
    """The batch object's ``obatch`` field: how the batch runs (``concurrency``: the levels chosen per host, and
    why), the estimate made at its start, while it runs the remaining time, and once it ended early how many lines
    never ran; obatch's version and the engine hosts with their versions and model digests; the structured-output
    counts; ``schedule``: the order used, the prefix groups found and the share of prompt tokens the engine took
    from its cache where it tells; the retry chain it belongs to (``parent``, ``retries``); ``cached``: the lines
    whose answer was reused. Fields without a value are left out."""

    concurrency: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    deadline: DeadlinePlan | None = None  # the estimate at creation against its completion_window
    estimate: DurationEstimate | None = None
    eta: BatchEta | None = None
    not_run: int | None = None
    version: str | None = None  # obatch's own version
    engines: list[EngineEntry] | None = None  # the engine hosts that ran it; a line's ``obatch.host`` is one of them
    invalid_output: int | None = None  # lines ended as invalid_output (the structured-output check), once final
    refused_answers: int | None = None  # answers that check refused over all lines (each asked again, or final)
    parent: str | None = None  # the batch whose failed lines this batch retries
    retries: list[str] | None = None  # the batches made of this one's failed lines, oldest first
    cached: int | None = None  # lines answered by reuse (a stored answer or an identical line's), live and final

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


Batch.model_rebuild()  # its ``obatch`` field is defined above it


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    """OpenAI's HTTP error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class ListPage(_Wire):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def new_id(kind: str, *, sep: str = "-", length: int = 24, secret: bool = True) -> str:
    """A fresh id in OpenAI's style: ``file-…``, ``batch-…``, ``chatcmpl-…``; request ids use ``sep="_"`` and 32
    hex digits (``batch_req_…``). ``secret=False`` for the ids made once per line (requests, answers): unique but
    not unguessable, drawn by Python's generator instead of the system's (a system call per line, which also hands
    the interpreter lock to any other thread, cost more than the rest of making the line's row)."""
    draw = os.urandom if secret else random.randbytes
    return f"{kind}{sep}{draw((length + 1) // 2).hex()[:length]}"


def output_text(response: dict[str, Any]) -> str:
    """The text of a Responses body's ``output_text`` parts (what the SDK's ``Response.output_text`` joins)."""
    return "".join(part.get("text") or "" for item in response.get("output") or [] if item.get("type") == "message"
                   for part in item.get("content") or [] if part.get("type") == "output_text")


def response_content(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(text, finish_reason) of a chat, completion or Responses body; a chat answer that only calls tools gives the
    calls as JSON; a response cut at ``max_output_tokens`` finished for "length". (None, None) for bodies without
    choices (embeddings)."""
    if body.get("object") == "response":
        return output_text(body), "length" if body.get("status") == "incomplete" else "stop"
    choices = body.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else None
    if first is None:
        return None, None
    message = first.get("message")
    if not isinstance(message, dict):
        return first.get("text"), first.get("finish_reason")
    content = message.get("content")
    if not content and message.get("tool_calls"):
        content = orjson.dumps(message["tool_calls"]).decode()
    return content, first.get("finish_reason")
