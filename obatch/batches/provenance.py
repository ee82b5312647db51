"""Where each answer came from: the engine host, its engine and version, and the model's digest.

These facts belong to a host and a model, not to a line, so a batch keeps them once (``BatchRow.engines_json``: a
short list, one entry per host, ``{host, engine, version, models: {name: digest}}``) and each line keeps only the
number of the entry that answered it (``RequestRow.host``). The output lines and the notebook frame join the two
when they are written. The list only grows: a batch resumed on other hosts appends them, so the numbers stored on
earlier lines keep their meaning.

The digest is the engine's own word for the model's weights: Ollama's ``/api/tags`` digest; for the embedded
engine, the GGUF file's SHA-256 (computed once per process, off the event loop); for an OpenAI-compatible engine,
whatever its ``/v1/models`` entry says of the model (a weaker guarantee: see docs/usage.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from obatch import errors
from obatch.backends.base import Backend
from obatch.backends.pool import Pool
from obatch.batches.services import Services, update_batch
from obatch.store.tables import BatchRow

# The facts of an output line's ``obatch`` field that come from its host entry, in the order they are written.
LINE_FIELDS = ("host", "engine", "engine_version", "model_digest")


def seed_of(body: dict[str, Any]) -> int | None:
    """The request's seed, kept on its row at import: OpenAI's ``seed``, else Ollama's ``options.seed``."""
    options = body.get("options")
    seed = body.get("seed", options.get("seed") if isinstance(options, dict) else None)
    if isinstance(seed, int) and not isinstance(seed, bool) and -(2 ** 63) <= seed < 2 ** 63:
        return seed
    return None  # none, or not one a 64-bit column holds (the body keeps it as given)


def obatch_version() -> str:
    """This obatch's version, as the batch object reports it."""
    from obatch import __version__

    return __version__


async def model_digest(backend: Backend, model: str) -> str | None:
    """The engine's identity of ``model``'s weights, or None where it tells nothing (see the module's docstring)."""
    inner: Any = backend
    while inner is not None:  # a wrapped backend (metrics, clocks) asks the one it wraps
        method = getattr(inner, "model_digest", None)
        if method is not None:
            return await method(model)  # type: ignore[no-any-return]
        inner = getattr(inner, "inner", None)
    wanted = {model, model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"}
    for info in await backend.models():
        if info.id in wanted:
            return info.digest
    return None


async def host_entry(backend: Backend, url: str, model: str) -> dict[str, Any]:
    """One host's entry for the batch's list; what the engine does not tell (or cannot, being down) stays None."""
    version = digest = None
    with contextlib.suppress(errors.BackendError):
        version = await backend.version()
    with contextlib.suppress(errors.BackendError):
        digest = await model_digest(backend, model)
    return {"host": url, "engine": backend.name, "version": version, "models": {model: digest}}


def merge(entries: list[dict[str, Any]], found: dict[str, Any]) -> int:
    """Add ``found`` to ``entries`` (the same host, engine and version share one entry, its models joined);
    returns the entry's number."""
    for i, entry in enumerate(entries):
        if all(entry.get(k) == found[k] for k in ("host", "engine", "version")):
            entry.setdefault("models", {}).update(found["models"])
            return i
    entries.append(found)
    return len(entries) - 1


def entries_of(batch: BatchRow) -> list[dict[str, Any]]:
    """The batch's host entries as stored (empty before its first model group ran)."""
    return list(orjson.loads(batch.engines_json)) if batch.engines_json else []


async def ask(pool: Pool, model: str) -> dict[str, dict[str, Any]]:
    """Once per model group: each host serving ``model``, with its version and the model's digest (``host_entry``),
    by its URL. The cache's identity of the model (``obatch.batches.reuse``) and the batch's list (``record``) are
    both made of this answer, so each engine is asked once."""
    return {host.url: await host_entry(host.backend, host.url, model) for host in pool.hosts if host.serves(model)}


async def record(svc: Services, batch: BatchRow, found: Mapping[str, dict[str, Any]]) -> dict[str, int]:
    """Before a model group runs: the hosts ``ask`` found, in the batch's list. Returns the number of each host's
    entry by its URL, for the lines it will answer."""
    entries = entries_of(batch)
    numbers = {url: merge(entries, {**entry, "models": dict(entry["models"])}) for url, entry in found.items()}
    text = orjson.dumps(entries).decode()
    if text != batch.engines_json:
        await update_batch(svc, batch, engines_json=text)
    return numbers


class LineFacts:
    """The provenance of output lines: each (host number, model) pair's facts, looked up once and reused."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self.entries = entries
        self._cache: dict[tuple[int | None, str | None], tuple[Any, ...]] = {}

    def __call__(self, host: int | None, model: str | None) -> tuple[Any, ...]:
        """``LINE_FIELDS``' values for a line answered by entry ``host`` (None where no host answered it)."""
        key = (host, model)
        found = self._cache.get(key)
        if found is None:
            entry = self.entries[host] if host is not None and 0 <= host < len(self.entries) else None
            if entry is None:
                found = (None, None, None, None)
            else:
                digest = (entry.get("models") or {}).get(model) if model is not None else None
                found = (entry.get("host"), entry.get("engine"), entry.get("version"), digest)
            self._cache[key] = found
        return found
