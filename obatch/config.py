"""Settings, read once from ``OBATCH_*`` environment variables (or a ``.env`` file) and passed down.

The CLI, the server and the notebook API each build one ``Settings`` at start-up and hand it to what they create;
nothing below them reads the environment. The exceptions sit at the edges, outside ``Settings``: the UI's HTTP
client (``Client.from_env``: ``OBATCH_SERVER_URL``, ``OBATCH_API_KEY``, which the server does not use) and
``obatch ui`` (``OBATCH_UI_APP``), and both take an explicit mapping in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "ollama", "openai", "local"]
Level = Annotated[int, Field(ge=1, le=1024)]


def split_urls(value: str | None) -> list[str]:
    """``"http://a:11434, http://b:11434/"`` → ``["http://a:11434", "http://b:11434"]``."""
    return [u.strip().rstrip("/") for u in (value or "").split(",") if u.strip()]


class Settings(BaseSettings):
    """Every knob obatch has. Field names map to ``OBATCH_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="OBATCH_", env_file=".env", extra="ignore")

    backend: BackendName = "auto"
    ollama_url: str = "http://127.0.0.1:11434"  # one Ollama server, or several separated by commas (a pool)
    openai_base_url: str | None = None  # one OpenAI-compatible base URL ending in /v1, or several (commas)
    openai_api_key: SecretStr | None = None

    data_dir: Path = Path("data")
    database_url: str | None = None

    # Input limits (OpenAI's defaults; a local server may raise them freely).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    max_lines: int = Field(default=50_000, gt=0)

    # Runner defaults. "auto" finds each engine host's best level by measuring (obatch.concurrency).
    concurrency: Level | Literal["auto"] = "auto"
    max_concurrency: int = Field(default=256, ge=1, le=1024)  # the ceiling auto may reach, per host
    request_timeout: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_initial_wait: float = Field(default=0.5, ge=0)
    retry_max_wait: float = Field(default=30.0, ge=0)
    commit_every: int = Field(default=1024, ge=1)  # with commit_interval: what a crash may send again
    commit_interval: float = Field(default=0.5, gt=0)

    # Embedded engine (llama.cpp via xllamacpp).
    local_model_path: Path | None = None
    local_model_alias: str = "smollm2:135m"
    local_threads: int | None = None
    local_n_ctx: int = Field(default=8192, ge=256)
    local_parallel: int = Field(default=8, ge=1, le=256)  # slots of the embedded engine when concurrency is auto
    default_model: str | None = None

    # Server.
    api_keys: SecretStr | None = None  # comma-separated bearer keys; unset (and no keys file) = no auth
    api_keys_file: Path | None = None  # one key per line, '#' starts a comment
    allow_public_bind: bool = False  # without keys, bind a non-loopback host only when this is set
    rate_limit_per_minute: int = Field(default=1200, ge=0)  # requests per key (or client address); 0 = off
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser; empty = none
    server_concurrency: Level | Literal["auto"] | None = None  # per host, over all batches; default: concurrency
    min_completion_window: int = Field(default=60, ge=1)  # shortest completion_window accepted, in seconds
    worker_poll_interval: float = Field(default=1.0, gt=0)  # how often the worker looks for new batches
    min_file_expiry: int = Field(default=3600, ge=1)  # shortest expires_after / output_expires_after, seconds
    file_sweep_interval: float = Field(default=60.0, gt=0)  # how often the server deletes expired files
    # Where the server drives batches: "process" (a supervised child at lower CPU priority; the API stays as quick
    # as when idle), "thread" (an event loop of its own in the server's process), "loop" (the API's own loop), or
    # "none" (an API-only server; other processes on the same store run the batches). The embedded engine ("local")
    # runs in the server's process, so its batches do too ("thread" and "process" mean "loop" there).
    batch_worker: Literal["process", "thread", "loop", "none"] = "process"
    worker_nice: int = Field(default=10, ge=0, le=19)  # how much lower the batch process's CPU priority is
    worker_thread: bool | None = None  # older spelling: false = batch_worker "loop", true = "thread"
    run_batches: bool | None = None  # older spelling: false = batch_worker "none"

    # Leases: one process drives a batch at a time; a dead process's batches are taken over once its lease expires.
    lease_ttl: float = Field(default=30.0, gt=0)  # seconds a lease lasts without a heartbeat
    lease_heartbeat: float = Field(default=5.0, gt=0)  # seconds between renewals (well under lease_ttl)
    log_level: str = "INFO"

    # ---- Server hardening: what one client may do to a server shared by a team (defaults in the README's
    # "Operator settings"). Limits apply to requests through ``obatch serve``; the CLI and notebook API are the
    # operator's own and are not policed.
    admin_keys: SecretStr | None = None  # comma-separated keys that also see global /metrics and host details
    address_rate_limit_per_minute: int = Field(default=2400, ge=0)  # any request per client address; 0 = off
    auth_failures_per_minute: int = Field(default=20, ge=0)  # wrong keys per address before it gets 429; 0 = off
    header_timeout: float = Field(default=10.0, gt=0)  # seconds to send a request's line and headers
    body_idle_timeout: float = Field(default=30.0, gt=0)  # longest pause while sending a request body
    upload_timeout: float = Field(default=600.0, gt=0)  # seconds to send a whole request body (an upload)
    keep_alive_timeout: int = Field(default=5, ge=1)  # an idle kept-alive connection is closed after this
    max_connections: int = Field(default=256, ge=1)  # open connections; beyond, requests are answered 503
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line and headers together
    max_json_depth: int = Field(default=64, ge=2, le=200)  # nesting of a JSON body or batch line
    client_engine_options: str = (  # the keys of a body's ``options`` clients may set (comma-separated)
        "temperature,top_p,top_k,min_p,typical_p,seed,stop,num_predict,repeat_penalty,repeat_last_n,"
        "presence_penalty,frequency_penalty,mirostat,mirostat_tau,mirostat_eta,tfs_z,penalize_newline")
    max_client_num_ctx: int = Field(default=32768, ge=0)  # largest num_ctx a client may ask for; 0 = none
    max_client_output_tokens: int = Field(default=32768, ge=1)  # largest max_tokens / num_predict
    allow_client_keep_alive: bool = False  # may clients set keep_alive (how long the engine keeps a model)?
    max_storage_bytes_per_key: int = Field(default=10 * 1024 ** 3, ge=0)  # stored files per key; 0 = no quota

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
