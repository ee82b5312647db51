"""A protocol-faithful Ollama simulator for tests and benchmarks (aiohttp, loopback only).

What it copies from Ollama, and where the behaviour is documented (ollama/ollama):

* Endpoints and shapes: ``docs/api.md`` — "Generate a chat completion" (``POST /api/chat``: NDJSON stream by
  default, final object carries ``done_reason``, ``total_duration``, ``load_duration``,
  ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``, ``eval_duration``; "Durations: All
  durations are returned in nanoseconds"), "Generate a completion" (``POST /api/generate``, ``response``
  instead of ``message``, ``context``), "Generate Embeddings" (``POST /api/embed``, ``truncate`` defaults to
  true), "List Local Models" (``/api/tags``), "Show Model Information" (``/api/show``), "List Running
  Models" (``/api/ps``); "Load a model" / "Unload a model" (empty ``messages``/``prompt`` answer
  ``done_reason`` ``load``/``unload`` without generating); "Model names" ("The tag is optional and, if not
  provided, will default to ``latest``").
* Streaming default: ``api/types.go`` ``ChatRequest.Stream`` — "Stream enable streaming of returned
  response; true by default" (a missing or ``null`` ``stream`` streams).
* Option types: ``api/types.go`` ``Options.FromMap`` — ``option "num_ctx" must be of type integer``,
  ``stop`` must be an array of strings (HTTP 400).
* Scheduling: ``docs/faq.md`` "How does Ollama handle concurrent requests?" — ``OLLAMA_NUM_PARALLEL``
  requests per model at once, ``OLLAMA_MAX_QUEUE`` (512) waiting requests, beyond that HTTP 503;
  ``server/sched.go`` ``ErrMaxQueue = "server busy, please try again.  maximum pending requests exceeded"``;
  ``needsReload`` reloads a loaded model when its runner options (``num_ctx`` among them) differ;
  ``OLLAMA_MAX_LOADED_MODELS`` evicts the least recently used model.
* Silent truncation: the runner's ``"truncating input prompt"`` path (``runner/llamarunner/runner.go``)
  keeps the first ``num_keep`` tokens and the *end* of the prompt, ``new == limit == num_ctx``; the only
  trace in the API is a ``prompt_eval_count`` smaller than the prompt. The sim reports ``prompt_eval_count
  == num_ctx`` (never an error). Newer Ollama builds (``llm/llama_server.go``) cut harder, to ``num_ctx -
  (num_ctx - num_keep) // 2``; a client must therefore treat *any* ``prompt_eval_count`` below its own
  estimate as possible truncation.

* Parallelism: an embedding model (and a ``SimModel(max_parallel=1)``, like the families Ollama forces to one)
  serves one request at a time whatever ``num_parallel`` says; ``stats.max_concurrent_by_model`` shows it.
* Newer fields (2025–2026, ``api/types.go``): ``think`` (a bool or "low" / "medium" / "high"; a 400 for a model
  without the ``thinking`` capability) answers ``message.thinking`` — one chunk per thinking token when streamed —
  and its tokens count in ``eval_count`` and against ``num_predict``; ``logprobs`` / ``top_logprobs`` (0..20) answer
  a ``logprobs`` list of ``{token, logprob, bytes, top_logprobs}``; ``format`` takes "json" or a JSON schema.
  Context: a request without ``num_ctx`` runs with ``SimConfig.default_num_ctx`` (4096, like Ollama under 24 GiB of
  VRAM; ``--default-num-ctx`` sets it), clamped to the model's trained context, and ``/api/ps`` reports it as
  ``context_length``.

* Prompt cache (``SimConfig.prompt_cache``, off by default; ``--prompt-cache``): each of a model's slots keeps
  the token ids of its last request, prompt and answer, as the Go runner's ``InputCacheSlot`` does
  (``runner/ollamarunner/cache.go``). A request takes the free slot whose ids share the longest common prefix with
  its prompt (``LoadCacheSlot`` / ``findLongestCacheSlot``: the first such slot in slot order; requests wait for a
  slot first come, first served), and only the rest of the prompt is processed; a prompt found whole still
  processes its last token ("Leave one input to sample"). ``prompt_eval_count`` stays the whole prompt after
  truncation (the runner's ``numPromptInputs`` is counted before the cache is consulted; builds that run
  llama-server report ``cache_n + prompt_n``, "to preserve Ollama's pre-0.30 full-context prompt_eval_count
  semantics", ``llm/llama_server.go``); only ``prompt_eval_duration`` (and the time taken) shrinks. Nothing in the
  API says how much was cached: ``SimStats.cached_prompt_tokens`` counts it. A reload (another ``num_ctx``), an
  eviction or an unload empties the caches; an answer that overflows ``num_ctx`` shifts the slot as
  ``ShiftCacheSlot`` does (``num_keep`` tokens kept, half the rest dropped). ``OLLAMA_MULTIUSER_CACHE``'s
  least-recently-used slot choice is not modelled.

* Latency: ``prompt_tps`` and ``decode_tps`` are one slot's rates, so slots run side by side at full speed and
  ``prompt_eval_duration`` / ``eval_duration`` report the modelled times. With ``prompt_tps_shared``
  (``--prompt-tps-shared``) ``prompt_tps`` is the model's instead, shared by the prompts in progress at once (an
  engine processes all slots' prompt tokens in the same batches: prompt processing is bound by compute, decoding
  by memory), and ``prompt_eval_duration`` reports the time a prompt really took.

Deliberate simplifications: the tokenizer is :func:`count_tokens` (1 token per 4 characters; the ids of
:func:`chat_prompt_ids` are the CRC-32 of each 4-character piece of a message, around chat-template tokens); content is
words drawn deterministically from (model, prompt text, ``options.seed``); a reload for another ``num_ctx``
does not wait for the model's in-flight requests; LRU eviction may evict a model that is still serving.
Faults (``error_rate``, ``reset_rate``, ``hang_rate``, ``stream_error_rate``) are drawn from
``random.Random(seed)`` once per request to ``/api/chat``, ``/api/generate`` and ``/api/embed``, after the
body is read and before it is validated or queued.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import random
import re
import signal
import socket
import struct
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "BUSY_MESSAGE",
    "MESSAGE_OVERHEAD_TOKENS",
    "PROMPT_OVERHEAD_TOKENS",
    "OllamaSim",
    "SimConfig",
    "SimModel",
    "SimStats",
    "chat_prompt_ids",
    "chat_prompt_tokens",
    "count_tokens",
    "generate_prompt_ids",
    "generate_prompt_tokens",
    "main",
    "run_in_thread",
]

# server/sched.go ErrMaxQueue
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MESSAGE_OVERHEAD_TOKENS = 4  # chat-template tokens around each message
PROMPT_OVERHEAD_TOKENS = 3  # the assistant header that starts the answer
NUM_KEEP = 4  # api/types.go DefaultOptions: the tokens a truncation or a context shift keeps at the start
_START, _END_HEADER, _END_TURN = -1, -2, -3  # chat-template token ids (pieces of text have ids >= 0)
FAULT_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed"})
_VOCAB = (
    "the", "model", "reads", "each", "prompt", "and", "writes", "a", "short", "answer", "about", "data",
    "time", "light", "water", "stone", "river", "cloud", "signal", "number", "table", "batch", "queue",
    "token", "value", "order", "system", "memory", "graph", "field", "vector", "result", "reason", "simple",
    "clear", "quick", "small", "large", "early", "late", "north", "south", "bright", "quiet", "steady",
    "random", "local", "remote",
)
THINK_WORDS = {"low": 6, "medium": 16, "high": 32}  # thinking length by level; ``true`` thinks like "medium"
MAX_TOP_LOGPROBS = 20
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def count_tokens(text: str) -> int:
    """The sim's tokenizer: one token per 4 characters, rounded up (``""`` is 0 tokens)."""
    return (len(text) + 3) // 4


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def _message_text(message: dict[str, Any]) -> str:
    text = message.get("content") or ""
    text = text if isinstance(text, str) else _dumps(text)
    if message.get("tool_calls"):
        text += _dumps(message["tool_calls"])
    return text


def chat_prompt_tokens(messages: list[dict[str, Any]], tools: list[Any] | None = None) -> int:
    """Prompt tokens of a chat before truncation: ``3 + sum(4 + count_tokens(content [+ tool_calls JSON]))``
    plus ``count_tokens`` of the tools as sorted-key compact JSON when tools are given."""
    per_message = (MESSAGE_OVERHEAD_TOKENS + count_tokens(_message_text(m)) for m in messages)
    total = PROMPT_OVERHEAD_TOKENS + sum(per_message)
    return total + (count_tokens(_dumps(tools)) if tools else 0)


def generate_prompt_tokens(prompt: str, system: str | None = None, *, raw: bool = False,
                           suffix: str = "") -> int:
    """Prompt tokens of ``/api/generate``: the chat rule for ``[system?, user prompt]``; ``raw`` is just
    ``count_tokens(prompt + suffix)``."""
    if raw:
        return count_tokens(prompt + suffix)
    messages = ([{"content": system}] if system else []) + [{"content": prompt + suffix}]
    return chat_prompt_tokens(messages)


def _text_ids(text: str) -> list[int]:
    """Token ids of a text, one per ``count_tokens`` token: the CRC-32 of each 4-character piece."""
    return [zlib.crc32(text[i : i + 4].encode()) for i in range(0, len(text), 4)]


def _header_ids(role: str) -> list[int]:
    """The chat template's header of a message (``PROMPT_OVERHEAD_TOKENS`` ids; the end of turn makes a message's
    ``MESSAGE_OVERHEAD_TOKENS``), so an answer kept in a slot lines up with the same answer sent back as history."""
    return [_START, -16 - zlib.crc32(role.encode()), _END_HEADER]


def chat_prompt_ids(messages: list[dict[str, Any]], tools: list[Any] | None = None) -> list[int]:
    """The rendered prompt of a chat as token ids, ``chat_prompt_tokens`` of them: the tools, each message's
    header, content and end of turn, then the assistant header. Equal texts give equal ids, so prompts that
    share leading messages share a prefix."""
    ids = _text_ids(_dumps(tools)) if tools else []
    for m in messages:
        ids += _header_ids(str(m.get("role") or "user")) + _text_ids(_message_text(m)) + [_END_TURN]
    return ids + _header_ids("assistant")


def generate_prompt_ids(prompt: str, system: str | None = None, *, raw: bool = False, suffix: str = "") -> list[int]:
    """``/api/generate``'s prompt as token ids, ``generate_prompt_tokens`` of them."""
    if raw:
        return _text_ids(prompt + suffix)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt + suffix}]
    return chat_prompt_ids(messages)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """``countCommonPrefix``: how many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: halve with slice compares (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _truncated(ids: list[int], num_ctx: int) -> list[int]:
    """A prompt cut to ``num_ctx`` ids as the runner cuts it: the first ``NUM_KEEP`` and the end."""
    if len(ids) <= num_ctx:
        return ids
    keep = min(NUM_KEEP, num_ctx)
    return ids[:keep] + ids[len(ids) - (num_ctx - keep):]


def _shifted(ids: list[int], num_ctx: int) -> list[int]:
    """A slot's ids after the context shifts that make them fit ``num_ctx`` (``ShiftCacheSlot``: keep ``NUM_KEEP``,
    drop half of what follows)."""
    keep = min(NUM_KEEP, num_ctx - 1)
    while len(ids) > num_ctx:
        discard = max((num_ctx - keep) // 2, 1)
        ids = ids[:keep] + ids[keep + discard:]
    return ids


@dataclass(frozen=True)
class SimModel:
    """A model the sim "has pulled". ``"foo"`` and ``"foo:latest"`` name the same model (case-insensitive)."""

    name: str
    context_length: int = 8192
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q4_K_M"
    embedding_length: int = 16
    capabilities: tuple[str, ...] = ("completion", "tools")
    max_parallel: int | None = None  # a family Ollama forces to fewer slots (qwen3vl, lfm2, ... run one at a time)
    revision: str = ""  # another pull of the same name: other weights, another digest

    @property
    def parallel_cap(self) -> int | None:
        """The slots this model may have whatever ``OLLAMA_NUM_PARALLEL`` says: embedding models always load with
        one (server/sched.go), some families too."""
        if self.max_parallel is not None:
            return self.max_parallel
        return 1 if "completion" not in self.capabilities else None

    @property
    def key(self) -> str:
        return _canonical(self.name)

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.key}{self.revision}".encode()).hexdigest()

    @property
    def parameter_count(self) -> int:
        number = re.match(r"([\d.]+)\s*([KMBT]?)", self.parameter_size.upper())
        if number is None:
            return 1_000_000_000
        return int(float(number.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12, "": 1}[number.group(2)])

    @property
    def size(self) -> int:
        """Bytes on disk: ~0.6 bytes per parameter when quantized, 2 for F16/F32."""
        return int(self.parameter_count * (2.0 if self.quantization_level.upper().startswith("F") else 0.6))

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.family, "families": [self.family],
                "parameter_size": self.parameter_size, "quantization_level": self.quantization_level}


def _default_models() -> tuple[SimModel, ...]:
    return (
        SimModel("llama3.2:1b"),
        SimModel("qwen2.5:0.5b", context_length=32768, family="qwen2", parameter_size="494.03M"),
        SimModel("nomic-embed-text", family="nomic-bert", parameter_size="137M", quantization_level="F16",
                 capabilities=("embedding",), embedding_length=32),
        SimModel("qwen3:0.6b", context_length=40960, family="qwen3", parameter_size="751.63M",
                 capabilities=("completion", "tools", "thinking")),
    )


@dataclass
class SimConfig:
    """Server settings (the ``OLLAMA_*`` environment of a real server) and the latency / fault model.

    ``num_parallel`` is per model (like ``OLLAMA_NUM_PARALLEL``); ``max_queue`` bounds the requests waiting for
    a slot over all models (like ``OLLAMA_MAX_QUEUE``). Rates are fractions of inference requests."""

    models: tuple[SimModel, ...] = field(default_factory=_default_models)
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL, per model
    max_queue: int = 512  # OLLAMA_MAX_QUEUE, waiting requests over all models
    max_loaded_models: int = 3
    default_num_ctx: int = 4096
    load_seconds: float = 0.0
    prompt_tps: float = 0.0  # 0 = instant
    prompt_tps_shared: bool = False  # prompt_tps is the model's: the prompts processed at once share it
    decode_tps: float = 0.0  # 0 = instant
    default_output_tokens: int = 24
    error_rate: float = 0.0
    reset_rate: float = 0.0
    hang_rate: float = 0.0
    stream_error_rate: float = 0.0  # streams that end in an NDJSON {"error": ...} line after status 200
    invalid_json_rate: float = 0.0  # answers to a ``format`` request cut short: not JSON (a small model's habit)
    prompt_cache: bool = False  # each slot keeps its last prompt; a shared prefix is not processed again
    seed: int = 0
    version: str = "0.12.6"


@dataclass
class SimStats:
    """Counters, updated on the sim's event loop; read them after the requests you care about finished."""

    requests: Counter[str] = field(default_factory=Counter)  # by path, every request
    served: int = 0  # inference requests answered in full
    answered: Counter[str] = field(default_factory=Counter)  # the same, by path
    errors_injected: int = 0
    resets_injected: int = 0
    hangs_injected: int = 0
    stream_errors_injected: int = 0
    invalid_json_injected: int = 0
    busy_503: int = 0
    loads: int = 0  # loads and reloads
    unloads: int = 0
    truncated: int = 0  # prompts cut to num_ctx
    running: int = 0
    queued: int = 0
    max_concurrent_seen: int = 0
    max_queued_seen: int = 0
    max_concurrent_by_model: Counter[str] = field(default_factory=Counter)
    model_requests: Counter[str] = field(default_factory=Counter)  # canonical name -> validated requests
    num_ctx_seen: Counter[int] = field(default_factory=Counter)  # effective num_ctx -> requests
    prompt_tokens: int = 0  # as prompt_eval_count reports them: cached ones included
    cached_prompt_tokens: int = 0  # of those, the ones a slot's prompt cache held (not processed)
    cache_hits: int = 0  # requests that found some of their prompt in a slot
    eval_tokens: int = 0


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Aborted(Exception):
    """The connection was closed on purpose; no response is written."""


@dataclass
class _Runner:
    model: SimModel
    num_ctx: int
    expires_at: float | None = None  # time.time(); None = never
    in_use: int = 0


@dataclass(eq=False)
class _Slot:
    """One of a model's ``num_parallel`` slots and its prompt cache (``InputCacheSlot``): the ids it holds are
    valid while ``runner`` is the model's loaded runner."""

    id: int
    ids: list[int] = field(default_factory=list)
    runner: _Runner | None = None
    in_use: bool = False

    def cached(self, prompt: list[int] | None, runner: _Runner | None) -> int:
        """How many leading ids of ``prompt`` this slot holds for ``runner``."""
        if not prompt or runner is None or self.runner is not runner:
            return 0
        return _common_prefix(self.ids, prompt)


@dataclass(eq=False)
class _Slots:
    """A model's slots and the requests waiting for one, first come, first served (the runner's ``seqsSem``)."""

    slots: list[_Slot]
    waiting: deque[tuple[asyncio.Future[_Slot], list[int] | None]] = field(default_factory=deque)

    def free(self) -> bool:
        return any(not s.in_use for s in self.slots)

    def take(self, prompt: list[int] | None, runner: _Runner | None) -> _Slot:
        """``findLongestCacheSlot``: the free slot with the longest common prefix, the first one on a tie."""
        best, longest = self.slots[0], -1
        for slot in self.slots:
            if not slot.in_use and (n := slot.cached(prompt, runner)) > longest:
                best, longest = slot, n
        best.in_use = True
        return best


class _SharedRate:
    """Work at ``rate`` units/s shared equally by the jobs in progress (processor sharing): a model's prompt
    processing, where the slots' prompt tokens go through the engine in the same batches (llama.cpp's and the
    runners' ``n_batch``), so eight prompts at once take eight times as long as one. Decoding is not shared: it is
    bound by memory bandwidth, and a batch of one token per slot costs about what one token costs."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.jobs: dict[asyncio.Future[None], float] = {}  # job -> units left
        self.since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    async def run(self, units: float) -> None:
        loop = asyncio.get_running_loop()
        self._advance(loop.time())
        job: asyncio.Future[None] = loop.create_future()
        self.jobs[job] = units
        self._plan(loop)
        try:
            await job
        finally:
            if self.jobs.pop(job, None) is not None:  # cancelled: the others get its share
                self._advance(loop.time())
                self._plan(loop)

    def _advance(self, now: float) -> None:
        if self.jobs:
            done = (now - self.since) * self.rate / len(self.jobs)
            for job in self.jobs:
                self.jobs[job] -= done
        self.since = now

    def _plan(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.jobs:
            delay = max(min(self.jobs.values()), 0.0) * len(self.jobs) / self.rate
            self.timer = loop.call_later(delay, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        self._advance(loop.time())
        for job, left in list(self.jobs.items()):
            if left <= 1e-6:
                del self.jobs[job]
                if not job.done():
                    job.set_result(None)
        self._plan(loop)


@dataclass
class _Plan:
    pieces: list[str]  # one text piece per generated token
    eval_count: int  # thinking tokens included, as Ollama counts them
    done_reason: str
    tool_calls: list[dict[str, Any]] | None = None
    thinking: list[str] = field(default_factory=list)  # one piece per thinking token, before the answer


def _canonical(name: str) -> str:
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now_rfc3339(ts: float | None = None) -> str:
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json",
                        charset="utf-8")


def _ns(seconds: float) -> int:
    return max(1, round(seconds * 1e9))


def _nominal_ns(count: int, tps: float) -> int:
    """Modelled duration of ``count`` tokens: ``count / tps``; "instant" (tps 0) reports 1 µs per token."""
    return round(count / tps * 1e9) if tps > 0 else count * 1000


def _parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded after the request (default 5m), ``None`` for forever (negative values)."""
    if value is None:
        return 300.0
    if isinstance(value, bool):
        raise _ApiError(400, "invalid keep_alive")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            sign = -1.0 if value.startswith("-") else 1.0
            body = value.lstrip("+-")
            parts = _DURATION_RE.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise _ApiError(400, f'time: invalid duration "{value}"') from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise _ApiError(400, "invalid keep_alive")
    return None if seconds < 0 else seconds


def _int_option(options: dict[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _ApiError(400, f'option "{key}" must be of type integer')
    return int(value)


def _stop_option(options: dict[str, Any]) -> list[str]:
    value = options.get("stop")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _ApiError(400, 'option "stop" must be of an array of strings')
    return [s for s in value if s]


def _fill_schema(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value that matches a (simple) JSON schema: every property filled with a value of its type."""
    if not isinstance(schema, dict) or depth > 6:
        return " ".join(rng.choice(_VOCAB) for _ in range(2))
    if schema.get("enum"):
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _fill_schema(schema[key][0], rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return {k: _fill_schema(v, rng, depth + 1) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 2)), 1)
        return [_fill_schema(schema.get("items"), rng, depth + 1) for _ in range(count)]
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        return round(rng.uniform(float(schema.get("minimum", 0)), float(schema.get("maximum", 100))), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 3)))


def _chunks(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _think_value(value: Any) -> Any:
    """``think``: a bool or "high" / "medium" / "low" (api/types.go ``ThinkValue``); anything else is a 400."""
    if value is None or isinstance(value, bool) or value in THINK_WORDS:
        return value
    raise _ApiError(400, f'invalid think value: {_dumps(value)} (must be "high", "medium", "low", true, or false)')


def _plan(model: SimModel, prompt_text: str, options: dict[str, Any], fmt: Any, tools: list[Any],
          last_user: str, default_tokens: int, think: Any = None) -> _Plan:
    """Deterministic output for (model, prompt text, options.seed): words, JSON for ``format``, or a tool call
    when tools are given and the last user message names a tool or says "weather"; thinking first when ``think``
    asks for it (its tokens count in ``eval_count`` and in ``num_predict``, as Ollama's do)."""
    seed = hashlib.sha256(f"{model.key}\0{prompt_text}\0{options.get('seed')}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    num_predict = _int_option(options, "num_predict")
    limit = num_predict if num_predict is not None and num_predict > 0 else None
    thinking: list[str] = []
    if think:
        words = ["Let", "me", "think"] + [rng.choice(_VOCAB) for _ in range(THINK_WORDS.get(think, 16) - 3)]
        thinking = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        if limit is not None:
            thinking, limit = thinking[:limit], max(limit - len(thinking), 0)
        if limit == 0:
            return _Plan([], len(thinking), "length", thinking=thinking)
    plan = _answer(rng, options, fmt, tools, last_user, default_tokens, limit)
    plan.thinking, plan.eval_count = thinking, plan.eval_count + len(thinking)
    return plan


def _answer(rng: random.Random, options: dict[str, Any], fmt: Any, tools: list[Any], last_user: str,
            default_tokens: int, limit: int | None) -> _Plan:
    lowered = last_user.lower()
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    tool = next((t for t in named if (n := str(t["function"].get("name") or "").lower()) and n in lowered), None)
    if tool is None and named and "weather" in lowered:
        tool = named[0]
    if tool is not None:
        function = tool["function"]
        args = _fill_schema(function.get("parameters") or {"type": "object", "properties": {}}, rng)
        call = {"function": {"index": 0, "name": function.get("name", ""), "arguments": args}}
        pieces = _chunks(_dumps({"name": function.get("name", ""), "arguments": args}))
        if limit is not None and limit < len(pieces):
            return _Plan(pieces[:limit], limit, "length")  # a cut tool call comes back as raw text
        return _Plan(pieces, len(pieces), "stop", [call])
    lo = min(8, default_tokens)
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(max(lo, 1), max(lo, 2 * default_tokens, 1)))]
    if fmt == "json":
        pieces = _chunks(_dumps({"answer": " ".join(words)}))
    elif isinstance(fmt, dict):
        pieces = _chunks(_dumps(_fill_schema(fmt, rng)))
    else:
        words[0] = words[0].capitalize()
        words[-1] += "."
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
    reason = "stop"
    if limit is not None and limit < len(pieces):
        pieces, reason = pieces[:limit], "length"
    count = len(pieces)
    stops = _stop_option(options)
    text = ""
    for i, piece in enumerate(pieces if stops else ()):
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:  # the answer ends before the stop string; the token that completed it still counts
            content, kept, used = text[: min(hits)], [], 0
            for p in pieces[: i + 1]:
                if used < len(content):
                    kept.append(p[: len(content) - used])
                used += len(p)
            pieces, count, reason = kept, i + 1, "stop"
            break
    return _Plan(pieces, count, reason)


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """None when the request wants no logprobs, else how many alternatives per token (0..20)."""
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise _ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    if not body.get("logprobs"):
        return None
    return int(top or 0)


def _logprobs(pieces: list[str], top: int) -> list[dict[str, Any]]:
    """One entry per generated token: ``{token, logprob, bytes, top_logprobs?}`` (the token itself leads its
    alternatives), deterministic in the token and its position."""
    out = []
    for i, piece in enumerate(pieces):
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{i}\0{piece}".encode()).digest()[:8], "big"))
        logprob = -round(rng.random() * 2, 4)
        entry: dict[str, Any] = {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
        if top:
            alternatives = [f" {rng.choice(_VOCAB)}" for _ in range(top - 1)]
            entry["top_logprobs"] = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}] + [
                {"token": t, "logprob": round(logprob - 1 - j - rng.random(), 4), "bytes": list(t.encode())}
                for j, t in enumerate(alternatives)]
        out.append(entry)
    return out


def _embedding(model: SimModel, text: str, dimensions: int | None) -> list[float]:
    seed = hashlib.sha256(f"{model.key}\0{text}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    vector = [rng.gauss(0.0, 1.0) for _ in range(model.embedding_length)]
    if dimensions:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class OllamaSim:
    """The simulator: ``async with OllamaSim(cfg) as sim: ... sim.url`` or ``await start()`` / ``stop()``."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.host, self.port = host, port
        self.url = ""
        self.stats = SimStats()
        self._models = {m.key: m for m in self.config.models}
        self._rng = random.Random(self.config.seed)
        self._loaded: OrderedDict[str, _Runner] = OrderedDict()
        self._slots: dict[str, _Slots] = {}
        self._prompt_rates: dict[str, _SharedRate] = {}
        self._running: Counter[str] = Counter()
        self._load_lock: asyncio.Lock | None = None
        self._stopping: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        self._load_lock, self._stopping = asyncio.Lock(), asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/embed", self._embed)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # wakes hung requests
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> OllamaSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- plumbing -----------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        self.stats.requests[request.path] += 1
        try:
            return await handler(request)
        except _ApiError as exc:
            return _json({"error": exc.message}, exc.status)
        except _Aborted:
            return web.Response()  # the transport is gone: aiohttp drops this quietly

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Close the connection with a TCP RST (SO_LINGER 0) and no response."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if request.path in FAULT_PATHS:
            await self._inject_fault(request)
        if not raw.strip():
            raise _ApiError(400, "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _ApiError(400, f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "invalid request: expected a JSON object")
        return body

    async def _inject_fault(self, request: web.Request) -> None:
        cfg = self.config
        if cfg.error_rate <= 0 and cfg.reset_rate <= 0 and cfg.hang_rate <= 0:
            return
        draw = self._rng.random()
        if draw < cfg.error_rate:
            self.stats.errors_injected += 1
            raise _ApiError(500, "simulated internal error")
        if draw < cfg.error_rate + cfg.reset_rate:
            self.stats.resets_injected += 1
            self._abort(request)
            raise _Aborted
        if draw < cfg.error_rate + cfg.reset_rate + cfg.hang_rate:
            self.stats.hangs_injected += 1
            assert self._stopping is not None
            await self._stopping.wait()  # the client gives up (handler cancelled) or the sim stops
            self._abort(request)
            raise _Aborted

    def _model(self, body: dict[str, Any], *, field_names: tuple[str, ...] = ("model",),
               show: bool = False) -> tuple[str, SimModel]:
        name = next((body[k] for k in field_names if isinstance(body.get(k), str) and body[k]), "")
        if not name:
            raise _ApiError(400, "model is required")
        model = self._models.get(_canonical(name))
        if model is None:
            raise _ApiError(404, f"model '{name}' not found" if show else
                            f"model {_dumps(name)} not found, try pulling it first")
        return name, model

    def _num_ctx(self, model: SimModel, options: dict[str, Any]) -> int:
        requested = _int_option(options, "num_ctx")
        # llm/server.go clamps num_ctx to the model's trained context ("requested context size too large")
        num_ctx = min(requested if requested and requested > 0 else self.config.default_num_ctx,
                      model.context_length)
        self.stats.model_requests[model.key] += 1
        self.stats.num_ctx_seen[num_ctx] += 1
        return num_ctx

    @contextlib.asynccontextmanager
    async def _slot(self, model: SimModel, prompt: list[int] | None = None) -> AsyncIterator[_Slot]:
        """One of the model's ``num_parallel`` slots, the one whose cache shares most of ``prompt``; waits in the
        shared queue; 503 if ``max_queue`` wait."""
        count = min(self.config.num_parallel, model.parallel_cap or self.config.num_parallel)
        slots = self._slots.get(model.key)
        if slots is None:
            slots = self._slots[model.key] = _Slots([_Slot(i) for i in range(max(1, count))])
        stats = self.stats
        if slots.free() and not slots.waiting:
            slot = slots.take(prompt, self._loaded.get(model.key))  # free slot: no yield
        else:
            if stats.queued >= self.config.max_queue:
                stats.busy_503 += 1
                raise _ApiError(503, BUSY_MESSAGE)
            stats.queued += 1
            stats.max_queued_seen = max(stats.max_queued_seen, stats.queued)
            ticket: tuple[asyncio.Future[_Slot], list[int] | None] = (
                asyncio.get_running_loop().create_future(), prompt)
            slots.waiting.append(ticket)
            try:
                slot = await ticket[0]
            except asyncio.CancelledError:
                if ticket[0].done() and not ticket[0].cancelled():
                    self._free(model, slots, ticket[0].result())  # handed a slot, then cancelled: pass it on
                elif ticket in slots.waiting:  # a slot freed meanwhile may have passed over it already
                    slots.waiting.remove(ticket)
                raise
            finally:
                stats.queued -= 1
        stats.running += 1
        self._running[model.key] += 1
        stats.max_concurrent_seen = max(stats.max_concurrent_seen, stats.running)
        stats.max_concurrent_by_model[model.key] = max(stats.max_concurrent_by_model[model.key],
                                                       self._running[model.key])
        try:
            yield slot
        finally:
            stats.running -= 1
            self._running[model.key] -= 1
            self._free(model, slots, slot)

    def _free(self, model: SimModel, slots: _Slots, slot: _Slot) -> None:
        """Give the slot back, or to the first waiting request (its best free slot, as the runner picks it)."""
        slot.in_use = False
        while slots.waiting:
            future, prompt = slots.waiting.popleft()
            if not future.done():  # a request cancelled while it waited (its handler not yet run) takes nothing
                future.set_result(slots.take(prompt, self._loaded.get(model.key)))
                return

    def _expire(self) -> None:
        now = time.time()
        for key, runner in list(self._loaded.items()):
            if runner.in_use == 0 and runner.expires_at is not None and runner.expires_at <= now:
                del self._loaded[key]
                self.stats.unloads += 1

    async def _acquire_runner(self, model: SimModel, num_ctx: int) -> tuple[_Runner, int]:
        """Load (or reload, if ``num_ctx`` changed) the model; returns the runner and load_duration in ns."""
        assert self._load_lock is not None
        started = time.monotonic()
        async with self._load_lock:  # the scheduler places one model at a time
            self._expire()
            runner = self._loaded.get(model.key)
            if runner is None or runner.num_ctx != num_ctx:
                if runner is not None:
                    del self._loaded[model.key]  # needsReload: runner options changed
                    self.stats.unloads += 1
                while len(self._loaded) >= max(1, self.config.max_loaded_models):
                    self._loaded.popitem(last=False)
                    self.stats.unloads += 1
                self.stats.loads += 1
                if self.config.load_seconds > 0:
                    await asyncio.sleep(self.config.load_seconds)
                runner = _Runner(model, num_ctx)
                self._loaded[model.key] = runner
            self._loaded.move_to_end(model.key)
            runner.in_use += 1
            runner.expires_at = None
        return runner, _ns(time.monotonic() - started)

    async def _process_prompt(self, model: SimModel, tokens: int) -> int:
        """Spend the time ``tokens`` prompt tokens take; returns the ``prompt_eval_duration`` to report (ns): the
        modelled time, or the time they really took when the model's prompt rate is shared."""
        cfg, nominal = self.config, _nominal_ns(tokens, self.config.prompt_tps)
        if cfg.prompt_tps <= 0 or tokens <= 0:
            return nominal
        if not cfg.prompt_tps_shared:
            await asyncio.sleep(tokens / cfg.prompt_tps)
            return nominal
        rate = self._prompt_rates.setdefault(model.key, _SharedRate(cfg.prompt_tps))
        started = time.monotonic()
        await rate.run(tokens)
        return max(nominal, _ns(time.monotonic() - started))

    def _load_cache(self, slot: _Slot, runner: _Runner, prompt: list[int] | None) -> int:
        """``LoadCacheSlot``: how many leading ids of ``prompt`` the slot already holds (all but the last at most:
        one is processed to start sampling); the slot keeps those and drops the rest."""
        if prompt is None:
            return 0
        cached = min(slot.cached(prompt, runner), len(prompt) - 1)
        slot.ids, slot.runner = prompt[:cached], runner
        self.stats.cached_prompt_tokens += cached
        self.stats.cache_hits += cached > 0
        return cached

    def _release_runner(self, runner: _Runner, keep_alive: float | None) -> None:
        runner.in_use -= 1
        if runner.in_use == 0:
            runner.expires_at = None if keep_alive is None else time.time() + keep_alive
            self._expire()

    # -- inference ----------------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await self._body(request)
        name, model = self._model(body)
        if "completion" not in model.capabilities:
            raise _ApiError(400, f"{_dumps(name)} does not support chat")
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _ApiError(400, "invalid messages: expected an array of message objects")
        tools = body.get("tools") or []
        if tools and "tools" not in model.capabilities:
            raise _ApiError(400, f"registry.ollama.ai/library/{model.name} does not support tools")
        if _think_value(body.get("think")) and "thinking" not in model.capabilities:
            raise _ApiError(400, f"{_dumps(name)} does not support thinking")
        last_user = _message_text(messages[-1]) if messages and messages[-1].get("role") == "user" else ""
        prompt_text = "\n".join(_message_text(m) for m in messages)
        tokens = chat_prompt_tokens(messages, tools)
        ids = chat_prompt_ids(messages, tools) if self.config.prompt_cache else None
        return await self._complete(request, started, body, name, model, chat=True, empty=not messages,
                                    prompt_tokens=tokens, prompt_text=prompt_text, tools=tools,
                                    last_user=last_user, prompt_ids=ids)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await self._body(request)
        name, model = self._model(body)
        if "completion" not in model.capabilities:
            raise _ApiError(400, f"{_dumps(name)} does not support generate")
        prompt, system, suffix = (str(body.get(k) or "") for k in ("prompt", "system", "suffix"))
        raw = bool(body.get("raw"))
        tokens = generate_prompt_tokens(prompt, system or None, raw=raw, suffix=suffix)
        ids = generate_prompt_ids(prompt, system or None, raw=raw, suffix=suffix) if self.config.prompt_cache else None
        return await self._complete(request, started, body, name, model, chat=False, empty=not prompt,
                                    prompt_tokens=tokens, prompt_text=f"{system}\n{prompt}{suffix}", tools=[],
                                    last_user=prompt, raw=raw, prompt_ids=ids)

    async def _complete(self, request: web.Request, started: float, body: dict[str, Any], name: str,
                        model: SimModel, *, chat: bool, empty: bool, prompt_tokens: int, prompt_text: str,
                        tools: list[Any], last_user: str, raw: bool = False,
                        prompt_ids: list[int] | None = None) -> web.StreamResponse:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _ApiError(400, "invalid options: expected an object")
        fmt = body.get("format") or None
        if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
            raise _ApiError(400, 'invalid format: expected "json" or a valid JSON schema')
        keep_alive = _parse_keep_alive(body.get("keep_alive"))
        num_ctx = self._num_ctx(model, options)
        think = _think_value(body.get("think")) if chat else None
        plan = _plan(model, prompt_text, options, fmt, tools, last_user, self.config.default_output_tokens, think)
        if fmt is not None and self.config.invalid_json_rate > 0 and self._rng.random() < self.config.invalid_json_rate:
            self.stats.invalid_json_injected += 1
            plan.pieces = plan.pieces[:-1] or ["{"]  # the answer stops before its JSON closes
        top = _top_logprobs(body)
        stream = body.get("stream") is not False
        cfg = self.config

        def chunk(text: str, done: bool, **extra: Any) -> dict[str, Any]:
            out: dict[str, Any] = {"model": name, "created_at": _now_rfc3339()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
                if "tool_calls" in extra:
                    out["message"]["tool_calls"] = extra.pop("tool_calls")
                if "thinking" in extra:
                    out["message"]["thinking"] = extra.pop("thinking")
            else:
                out["response"] = text
            out["done"] = done
            out.update(extra)
            return out

        if empty:  # docs/api.md "Load a model" / "Unload a model": one object, no generation
            async with self._slot(model):
                if keep_alive == 0:
                    if self._loaded.pop(model.key, None) is not None:
                        self.stats.unloads += 1
                    return _json(chunk("", True, done_reason="unload"))
                runner, _ = await self._acquire_runner(model, num_ctx)
                self._release_runner(runner, keep_alive)
            return _json(chunk("", True, done_reason="load") if chat else chunk("", True))

        ids = None if prompt_ids is None else _truncated(prompt_ids, num_ctx)  # the runner cuts, then looks up
        async with self._slot(model, ids) as slot:
            runner, load_ns = await self._acquire_runner(model, num_ctx)
            try:
                prompt_eval = min(prompt_tokens, num_ctx)  # silent truncation, see module docstring
                self.stats.truncated += prompt_tokens > num_ctx
                self.stats.prompt_tokens += prompt_eval
                self.stats.eval_tokens += plan.eval_count
                cached = self._load_cache(slot, runner, ids)
                prompt_ns = await self._process_prompt(model, prompt_eval - cached)
                eval_ns = _nominal_ns(plan.eval_count, cfg.decode_tps)
                if ids is not None:
                    slot.ids = ids  # the whole prompt is in the slot's cache now
                logprobs = _logprobs(plan.pieces, top) if top is not None and plan.tool_calls is None else None

                def final(text: str) -> dict[str, Any]:
                    if ids is not None:  # generation ended: the answer follows the prompt in the cache
                        answer = "".join(plan.thinking) + "".join(plan.pieces)
                        slot.ids = _shifted(ids + _text_ids(answer), num_ctx)
                    total = max(_ns(time.monotonic() - started), load_ns + prompt_ns + eval_ns)
                    extra: dict[str, Any] = {}
                    if not stream and plan.tool_calls is not None:
                        extra["tool_calls"] = plan.tool_calls
                    if not stream and plan.thinking:
                        extra["thinking"] = "".join(plan.thinking)
                    if not stream and logprobs is not None:
                        extra["logprobs"] = logprobs
                    out = chunk(text, True, **extra, done_reason=plan.done_reason, total_duration=total,
                                load_duration=load_ns, prompt_eval_count=prompt_eval,
                                prompt_eval_duration=prompt_ns, eval_count=plan.eval_count,
                                eval_duration=eval_ns)
                    if not chat and not raw:  # docs/api.md: "raw mode will not return a context"
                        out["context"] = [(31 * i + 7) % 32000 for i in range(prompt_eval + plan.eval_count)]
                    return out

                if not stream:
                    if cfg.decode_tps > 0:
                        await asyncio.sleep(plan.eval_count / cfg.decode_tps)
                    content = "" if plan.tool_calls is not None else "".join(plan.pieces)
                    self.stats.served += 1
                    self.stats.answered[request.path] += 1
                    return _json(final(content))
                return await self._stream(request, plan, chunk, final, logprobs)
            finally:
                self._release_runner(runner, keep_alive)

    async def _stream(self, request: web.Request, plan: _Plan, chunk: Callable[..., dict[str, Any]],
                      final: Callable[[str], dict[str, Any]], logprobs: list[dict[str, Any]] | None
                      ) -> web.StreamResponse:
        cfg = self.config
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        fail_at = -1
        if plan.tool_calls is None and cfg.stream_error_rate > 0 and self._rng.random() < cfg.stream_error_rate:
            self.stats.stream_errors_injected += 1
            fail_at = len(plan.pieces) // 2
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def pace(i: int) -> None:
            if cfg.decode_tps > 0:
                delay = t0 + (i + 1) / cfg.decode_tps - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)

        try:
            for i, piece in enumerate(plan.thinking):  # one chunk per thinking token, the answer after
                await pace(i)
                await response.write(orjson.dumps(chunk("", False, thinking=piece)) + b"\n")
            t0 += len(plan.thinking) / cfg.decode_tps if cfg.decode_tps > 0 else 0.0
            if plan.tool_calls is not None:
                if cfg.decode_tps > 0:
                    await asyncio.sleep(plan.eval_count / cfg.decode_tps)
                await response.write(orjson.dumps(chunk("", False, tool_calls=plan.tool_calls)) + b"\n")
            else:
                for i, piece in enumerate(plan.pieces):
                    if i == fail_at:
                        await response.write(orjson.dumps({"error": "simulated mid-stream error"}) + b"\n")
                        await response.write_eof()
                        return response
                    await pace(i)
                    extra = {"logprobs": [logprobs[i]]} if logprobs is not None else {}
                    await response.write(orjson.dumps(chunk(piece, False, **extra)) + b"\n")
            await response.write(orjson.dumps(final("")) + b"\n")
            await response.write_eof()
            self.stats.served += 1
            self.stats.answered[request.path] += 1
        except ConnectionError:
            pass  # the client went away
        return response

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await self._body(request)
        name, model = self._model(body)
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(x, str) for x in raw_input):
            inputs = list(raw_input)
        elif raw_input is None:
            inputs = []
        else:
            raise _ApiError(400, "invalid input type")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _ApiError(400, "invalid options: expected an object")
        dimensions = body.get("dimensions")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or dimensions <= 0):
            raise _ApiError(400, "dimensions must be a positive integer")
        keep_alive = _parse_keep_alive(body.get("keep_alive"))
        num_ctx = self._num_ctx(model, options)
        counts = []
        for text in inputs:
            tokens = max(1, count_tokens(text))
            if tokens > num_ctx:
                if body.get("truncate") is False:
                    raise _ApiError(400, "the input length exceeds the context length")
                tokens = num_ctx
                self.stats.truncated += 1
            counts.append(tokens)
        async with self._slot(model) as slot:
            runner, load_ns = await self._acquire_runner(model, num_ctx)
            slot.ids = []  # the runner embeds without its prompt cache (LoadCacheSlot with cachePrompt false)
            try:
                prompt_eval = sum(counts)
                self.stats.prompt_tokens += prompt_eval
                prompt_ns = await self._process_prompt(model, prompt_eval)
                vectors = [_embedding(model, text, dimensions) for text in inputs]
            finally:
                self._release_runner(runner, keep_alive)
        self.stats.served += 1
        self.stats.answered[request.path] += 1
        total = max(_ns(time.monotonic() - started), load_ns + prompt_ns)
        return _json({"model": name, "embeddings": vectors, "total_duration": total, "load_duration": load_ns,
                      "prompt_eval_count": prompt_eval})

    # -- metadata -----------------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json({"version": self.config.version})

    async def _tags(self, request: web.Request) -> web.Response:
        modified = _now_rfc3339(time.time() - 86400)
        return _json({"models": [
            {"name": m.key, "model": m.key, "modified_at": modified, "size": m.size, "digest": m.digest,
             "details": m.details()} for m in self.config.models]})

    async def _ps(self, request: web.Request) -> web.Response:
        self._expire()
        forever = time.time() + 100 * 365 * 86400
        return _json({"models": [
            {"name": r.model.key, "model": r.model.key, "size": r.model.size, "digest": r.model.digest,
             "details": r.model.details(),
             "expires_at": _now_rfc3339(forever if r.expires_at is None else r.expires_at),
             "size_vram": r.model.size, "context_length": r.num_ctx}
            for r in reversed(self._loaded.values())]})

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        _, m = self._model(body, field_names=("model", "name"), show=True)
        info: dict[str, Any] = {
            "general.architecture": m.family, "general.basename": m.key.split(":")[0],
            "general.parameter_count": m.parameter_count,
            f"{m.family}.context_length": m.context_length,
            f"{m.family}.embedding_length": m.embedding_length,
        }
        return _json({
            "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {m.key}\n",
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}",
            "details": m.details(), "model_info": info, "capabilities": list(m.capabilities),
            "modified_at": _now_rfc3339(time.time() - 86400),
        })


def run_in_thread(config: SimConfig | None = None, port: int = 0, *, host: str = "127.0.0.1",
                  sim: OllamaSim | None = None) -> tuple[str, Callable[[], None]]:
    """Serve a sim from a daemon thread with its own event loop, for sync code. Returns ``(url, stop)``;
    ``stop`` is idempotent. Pass ``sim=`` to keep a handle on ``sim.stats`` (``config``, ``port`` and ``host``
    are then unused)."""
    server = sim or OllamaSim(config, host=host, port=port)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["url"] = loop.run_until_complete(server.start())
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=target, name="ollama-sim", daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        raise box["error"]

    def stop() -> None:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    return str(box["url"]), stop


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m obatch.testing.ollama_sim",
                                description="Serve a simulated Ollama API until SIGINT/SIGTERM.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    p.add_argument("--model", action="append", default=[],
                   help="model name (repeatable, replaces the defaults; '*embed*' names embed only)")
    p.add_argument("--num-parallel", type=int, default=1)
    p.add_argument("--max-queue", type=int, default=512)
    p.add_argument("--max-loaded-models", type=int, default=3)
    p.add_argument("--default-num-ctx", type=int, default=4096)
    p.add_argument("--load-seconds", type=float, default=0.0)
    p.add_argument("--prompt-tps", type=float, default=0.0)
    p.add_argument("--decode-tps", type=float, default=0.0)
    p.add_argument("--output-tokens", type=int, default=24)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--stream-error-rate", type=float, default=0.0)
    p.add_argument("--invalid-json-rate", type=float, default=0.0,
                   help="fraction of format (JSON) answers cut before their JSON closes")
    p.add_argument("--prompt-tps-shared", action="store_true",
                   help="--prompt-tps is the model's, shared by the prompts processed at once")
    p.add_argument("--prompt-cache", action="store_true",
                   help="each slot keeps its last prompt; a request takes the slot sharing its longest prefix")
    p.add_argument("--seed", type=int, default=0)
    return p


async def _serve(config: SimConfig, host: str, port: int) -> None:
    async with OllamaSim(config, host=host, port=port) as sim:
        print(f"listening on {sim.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    config = SimConfig(
        num_parallel=a.num_parallel, max_queue=a.max_queue, max_loaded_models=a.max_loaded_models,
        default_num_ctx=a.default_num_ctx, load_seconds=a.load_seconds, prompt_tps=a.prompt_tps,
        decode_tps=a.decode_tps, default_output_tokens=a.output_tokens, error_rate=a.error_rate,
        reset_rate=a.reset_rate, hang_rate=a.hang_rate, stream_error_rate=a.stream_error_rate,
        invalid_json_rate=a.invalid_json_rate, prompt_tps_shared=a.prompt_tps_shared, prompt_cache=a.prompt_cache,
        seed=a.seed)
    if a.model:
        config.models = tuple(SimModel(n, capabilities=("embedding",), embedding_length=32) if "embed" in n
                              else SimModel(n) for n in a.model)
    asyncio.run(_serve(config, a.host, a.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
