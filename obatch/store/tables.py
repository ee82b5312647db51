"""SQLModel tables. Rows stay in the store: ``obatch.protocol`` models are what leaves it.

One ``RequestRow`` per input line, keyed by (batch_id, line) and unique on (batch_id, custom_id): output and error
files are assembled from these rows, so a line can be neither lost nor doubled, whatever crashed when.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Timestamps, sizes and token sums: 64 bits on PostgreSQL (its INTEGER is 32 bits, and Unix time leaves that in
# 2038); SQLite's INTEGER is 64 bits already.
WIDE = BigInteger().with_variant(Integer(), "sqlite")


class FileRow(SQLModel, table=True):
    __tablename__ = "files"

    id: str = Field(primary_key=True)
    owner: str = Field(default="", index=True)
    filename: str
    purpose: str
    bytes: int = Field(sa_type=WIDE)
    created_at: int = Field(sa_type=WIDE)
    sha256: str = Field(default="", index=True)
    status: str = "processed"
    expires_at: int | None = Field(default=None, sa_type=WIDE)


class BatchRow(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(primary_key=True)
    owner: str = Field(default="", index=True)
    endpoint: str
    input_file_id: str = Field(index=True)
    completion_window: str = "24h"
    status: str = Field(default="validating", index=True)
    created_at: int = Field(sa_type=WIDE)
    seq: int = Field(default=0, index=True)  # creation order (created_at has 1 s resolution)
    in_progress_at: int | None = Field(default=None, sa_type=WIDE)
    expires_at: int | None = Field(default=None, sa_type=WIDE)
    finalizing_at: int | None = Field(default=None, sa_type=WIDE)
    completed_at: int | None = Field(default=None, sa_type=WIDE)
    failed_at: int | None = Field(default=None, sa_type=WIDE)
    expired_at: int | None = Field(default=None, sa_type=WIDE)
    cancelling_at: int | None = Field(default=None, sa_type=WIDE)
    cancelled_at: int | None = Field(default=None, sa_type=WIDE)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors_json: str | None = None
    metadata_json: str | None = None
    model: str | None = None  # a model override applied to every line
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = Field(default=0, sa_type=WIDE)
    output_tokens: int = Field(default=0, sa_type=WIDE)
    reasoning_tokens: int = Field(default=0, sa_type=WIDE)  # of output_tokens, what reasoning models spent thinking
    output_expires_after: int | None = None  # seconds: the output/error files expire this long after creation
    imported: bool = False
    source: str = "api"  # api | cli | notebook
    signature: str | None = Field(default=None, index=True)  # what a CLI/notebook rerun matches to resume
    concurrency: int | None = None
    backend: str | None = None
    started_at: float | None = None  # first work on the batch (monotonic wall clock, seconds since epoch)
    run_seconds: float = 0.0  # time spent executing, summed over resumed runs
    estimate_json: str | None = None  # the duration estimate made before the run, kept to compare with reality
    concurrency_json: str | None = None  # each engine host's level, the reason for it, and its changes (auto)
    eta_json: str | None = None  # the live remaining-time estimate while it runs (``obatch.progress.LiveEta``)
    engines_json: str | None = None  # the engine hosts that ran it: [{host, engine, version, models: {name: digest}}]
    output_retries: int | None = None  # answers refused by the JSON check asked again per line (None: the setting)
    invalid_output: int = 0  # lines that ended as invalid_output (counted at finalisation)
    refused_answers: int = 0  # answers the JSON check refused, over all lines (counted at finalisation)
    schedule: str | None = None  # the order asked for its lines: "auto" or "file" (None: the settings' default)
    schedule_json: str | None = None  # what the scheduler found and did: prefix groups, the cache share seen
    parent_id: str | None = Field(default=None, index=True)  # the batch whose failed lines this one retries
    cached: int = 0  # lines answered by reuse (a stored answer, or an identical line's), counted as they are written
    plan_json: str | None = None  # the estimate at creation against its completion_window (``DeadlinePlan``)
    results_files: str | None = None  # JSON [output, error]: its compacted rows' files, relative to data_dir


class RequestRow(SQLModel, table=True):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_requests_batch_custom_id"),
        Index("ix_requests_batch_state_model", "batch_id", "state", "model"),
    )

    batch_id: str = Field(primary_key=True, foreign_key="batches.id")
    line: int = Field(primary_key=True)
    custom_id: str
    url: str
    model: str
    body: str  # the request body as JSON
    prompt_estimate: int = 0
    max_tokens: int | None = None
    prefix_key: int | None = Field(default=None, sa_type=BigInteger)  # its prompt's leading chunk (obatch.prefix)
    own_num_ctx: int | None = None  # the num_ctx the line sets itself (the scheduler runs such lines last)
    state: str = "pending"  # pending | succeeded | failed
    request_id: str | None = None  # "batch_req_..." id of the output line
    status_code: int | None = None
    response: str | None = None  # the response body as JSON
    error_code: str | None = None
    error_message: str | None = None
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None  # of completion_tokens
    latency_ms: float | None = None
    ttft_ms: float | None = None
    engine_prompt_ms: float | None = None
    engine_decode_ms: float | None = None
    engine_load_ms: float | None = None
    num_ctx: int | None = None
    loaded_context: int | None = None  # the context the engine really loaded for the model's group (/api/ps)
    attempts: int = 0
    truncated: bool = False
    finished_at: float | None = None
    host: int | None = None  # which entry of the batch's ``engines_json`` answered (a small number, not a URL)
    seed: int | None = Field(default=None, sa_type=WIDE)  # the request's seed, when it set one
    refused: int | None = None  # answers the structured-output check refused before this one (None: none)
    # The response cache (``obatch.cache``): the kind and hash of the canonical body, set at import; the identity of
    # the model that answers it, set when its model group starts; and, for a line answered by reuse, the line whose
    # answer it took (JSON: batch_id, custom_id).
    cache_key: str | None = Field(default=None, index=True)
    cache_identity: str | None = None
    cached_from: str | None = None
    # Compaction (``obatch.batches.compact``): once the output and error files are written, a row keeps where its line
    # is in them (the output file for a succeeded row, the error file otherwise) instead of the text they hold.
    out_offset: int | None = Field(default=None, sa_type=WIDE)
    out_length: int | None = None


class LeaseRow(SQLModel, table=True):
    """Who drives a batch now. A process claims the row, renews it by heartbeat and deletes it when done; a row whose
    ``expires_at`` has passed belongs to a dead (or stalled) process and may be claimed by another."""

    __tablename__ = "leases"

    batch_id: str = Field(primary_key=True)
    owner: str
    claimed_at: float
    heartbeat: float
    expires_at: float


class PilotRow(SQLModel, table=True):
    """A line of an input file run ahead of its batch by a pilot (``obatch estimate --pilot``): its answer tells how
    long the file's answers are, and the batch that later imports the same file takes it as a finished line instead
    of running it again (once: ``used_by`` names that batch). Keyed by its owner (the server's API key owner; ""
    for the CLI and notebook, as a batch's), the file's content, the line's custom_id and its body, so a changed line
    is never mistaken for the one that ran and a tenant never sees or reuses another's pilot lines."""

    __tablename__ = "pilots"

    owner: str = Field(default="", primary_key=True)
    file_sha256: str = Field(primary_key=True)
    custom_id: str = Field(primary_key=True)
    body_sha256: str
    model: str
    url: str
    max_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    latency_ms: float | None = None
    concurrency: int | None = None  # requests the pilot had in flight (its latencies belong to that level)
    result_json: str  # the finished request row's fields, as the batch stores them
    created_at: float
    used_by: str | None = None


# Finished lines (``obatch.store.finished``): at finalisation a succeeded line past the first ``KEEP_BODIES`` of a
# batch leaves ``requests`` for a narrow row: a small number for its batch, where its line lies in the output file,
# and what its line does not say or a count needs. Everything else is read back from that line.
class FinishedBatchRow(SQLModel, table=True):
    """A batch whose lines moved to ``finished_lines``, under a small number (``key``)."""

    __tablename__ = "finished_batches"

    key: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(foreign_key="batches.id", unique=True)


class FinishedModelRow(SQLModel, table=True):
    """The models of a batch's moved lines, each under a small number."""

    __tablename__ = "finished_models"

    batch_key: int = Field(primary_key=True, foreign_key="finished_batches.key")
    number: int = Field(primary_key=True)
    model: str


_DIGEST = text("cache_digest IS NOT NULL")


class FinishedLineRow(SQLModel, table=True):
    """A moved line: its batch's number, its line, where it is in the output file and the few numbers read without
    it; ``cache_digest`` (16 bytes of the cache key and the model identity, only for a line the cache may answer
    from) is what the response cache looks it up by."""

    __tablename__ = "finished_lines"
    __table_args__ = (
        Index("ix_finished_lines_cache_digest", "cache_digest", sqlite_where=_DIGEST, postgresql_where=_DIGEST),
        {"sqlite_with_rowid": False},
    )

    batch_key: int = Field(primary_key=True)
    line: int = Field(primary_key=True)
    out_offset: int = Field(sa_type=WIDE)
    out_length: int
    model: int  # its number in ``finished_models``
    host: int | None = None
    reused: bool = False  # answered by reuse (its output line names the line in ``cached_from``)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_digest: bytes | None = Field(default=None, sa_type=LargeBinary)


class EngineSlotsRow(SQLModel, table=True):
    """The slots auto concurrency read from an engine host (its base URL) for a model, from requests that waited
    inside it (``obatch.batches.slots``): the next run against that host and model starts there."""

    __tablename__ = "engine_slots"

    host: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    slots: int
    updated_at: float
