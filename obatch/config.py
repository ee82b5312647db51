"""Settings, read once from ``OBATCH_*`` environment variables (or a ``.env`` file) and passed down.

Nothing reads the environment after start-up: the CLI, the server and the notebook API each build one
``Settings`` and hand it to what they create.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "ollama", "openai", "local"]


class Settings(BaseSettings):
    """Every knob obatch has. Field names map to ``OBATCH_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="OBATCH_", env_file=".env", extra="ignore")

    backend: BackendName = "auto"
    ollama_url: str = "http://127.0.0.1:11434"
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None

    data_dir: Path = Path("data")
    database_url: str | None = None

    # Input limits (OpenAI's defaults; a local server may raise them freely).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    max_lines: int = Field(default=50_000, gt=0)

    # Runner defaults.
    concurrency: int = Field(default=4, ge=1, le=1024)
    request_timeout: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_initial_wait: float = Field(default=0.5, ge=0)
    retry_max_wait: float = Field(default=30.0, ge=0)
    commit_every: int = Field(default=64, ge=1)
    commit_interval: float = Field(default=0.5, gt=0)

    # Embedded engine (llama.cpp via xllamacpp).
    local_model_path: Path | None = None
    local_model_alias: str = "smollm2:135m"
    local_threads: int | None = None
    local_n_ctx: int = Field(default=8192, ge=256)
    default_model: str | None = None

    # Server.
    api_keys: SecretStr | None = None  # comma-separated bearer keys; unset (and no keys file) = no auth
    api_keys_file: Path | None = None  # one key per line, '#' starts a comment
    allow_public_bind: bool = False  # without keys, bind a non-loopback host only when this is set
    rate_limit_per_minute: int = Field(default=1200, ge=0)  # requests per key (or client address); 0 = off
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser; empty = none
    server_concurrency: int | None = Field(default=None, ge=1, le=1024)  # engine requests over all batches
    min_completion_window: int = Field(default=60, ge=1)  # shortest completion_window accepted, in seconds
    worker_poll_interval: float = Field(default=1.0, gt=0)  # how often the worker looks for new batches
    worker_thread: bool = True  # the server drives batches on an event loop of its own (keeps the API responsive)
    run_batches: bool = True  # false: an API-only server; other processes on the same store run the batches

    # Leases: one process drives a batch at a time; a dead process's batches are taken over once its lease expires.
    lease_ttl: float = Field(default=30.0, gt=0)  # seconds a lease lasts without a heartbeat
    lease_heartbeat: float = Field(default=5.0, gt=0)  # seconds between renewals (well under lease_ttl)
    log_level: str = "INFO"

    @field_validator("ollama_url", "openai_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @property
    def db_url(self) -> str:
        """The SQLAlchemy async URL: the configured one, or SQLite (WAL) in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'obatch.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
