"""The response cache's keys and policy: which requests may take an answer stored for an earlier identical one.

A request is looked up by its **key**, the hash of its endpoint and its canonical body (sorted keys; fields that do
not change the answer, like ``user`` or ``metadata``, left out), and by the **identity** of the model that answers it
(Ollama's model digest, the embedded engine's GGUF file hash, what an OpenAI-compatible engine reports). The key is
made once, when a line is imported, and says what kind of request it is: ``d:`` for one whose answer its body
determines (embeddings; chat, completions and responses at temperature 0 or with a ``seed``), ``s:`` for a sampled
one. The policy decides which kinds are looked up: ``auto`` the determined ones, ``all`` both, ``off`` none.

The answers themselves stay where they are (request rows whose output can still be read); see
``obatch.batches.reuse`` for the lookup and for lines of a batch that share a key running once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Literal, get_args

import orjson

from obatch import errors

CachePolicy = Literal["auto", "off", "all"]
POLICIES: tuple[str, ...] = get_args(CachePolicy)
METADATA_KEY = "obatch_cache"  # a batch's metadata field that sets its policy on the server

DETERMINED, SAMPLED = "d", "s"

# Body fields that do not change the answer: who asked, how it is delivered, how it is billed or stored.
IGNORED_FIELDS = frozenset({
    "user", "metadata", "stream", "stream_options", "store", "service_tier", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "background",
})


def kinds(policy: str) -> tuple[str, ...]:
    """The kinds of key a policy looks up."""
    return {"auto": (DETERMINED,), "all": (DETERMINED, SAMPLED)}.get(policy, ())


def determined(url: str, body: Mapping[str, Any]) -> bool:
    """Whether the body alone determines the answer: embeddings, or greedy decoding, or a fixed seed (OpenAI's fields,
    or Ollama's ``options`` where a body passes them)."""
    if url == "/v1/embeddings":
        return True
    options = body.get("options")
    options = options if isinstance(options, Mapping) else {}
    temperature = body.get("temperature", options.get("temperature"))
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return greedy or body.get("seed", options.get("seed")) is not None


def key(url: str, body: Mapping[str, Any]) -> str:
    """A request's cache key: its kind, then a hash of the endpoint and the canonical body."""
    canonical = orjson.dumps({k: v for k, v in body.items() if k not in IGNORED_FIELDS},
                             option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(url.encode() + b"\0" + canonical, digest_size=20).hexdigest()
    return f"{DETERMINED if determined(url, body) else SAMPLED}:{digest}"


def policy_of(default: str, metadata_json: str | None) -> str:
    """A batch's policy: its metadata's ``obatch_cache`` where set, else ``default`` (the run's or the server's)."""
    if metadata_json:
        chosen = orjson.loads(metadata_json).get(METADATA_KEY)
        if chosen in POLICIES:
            return str(chosen)
    return default


def check_metadata(metadata: Mapping[str, Any] | None) -> None:
    """Refuse a batch whose metadata asks for a policy that does not exist."""
    if metadata and METADATA_KEY in metadata and metadata[METADATA_KEY] not in POLICIES:
        raise errors.ConfigError(f"metadata.{METADATA_KEY} must be one of {', '.join(POLICIES)}; "
                                 f"got {str(metadata[METADATA_KEY])[:32]!r}.", param=f"metadata.{METADATA_KEY}")
