"""The figures of one benchmark point, computed from its measured requests (pure functions, no I/O).

Rules the seed broke and these functions keep:

* Throughput counts **completed** requests only; failed ones appear in the success rate, never as speed.
* Latency percentiles are over completed requests only (a fast failure is not a fast answer).
* Prompt and generation speeds come from the **engine's own** durations (Ollama's ``prompt_eval_duration`` /
  ``eval_duration``, llama.cpp's ``timings``), token-weighted: ``sum(tokens) / sum(ms)``. They are per-request
  (per-stream) speeds; ``output_tps`` is the system's: completion tokens of completed requests per wall second.
* TTFT and ITL are client-side, from the stream; TPOT is ``(latency - ttft) / (completion_tokens - 1)``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

QUANTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def stdev(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def rate(tokens: Sequence[float], milliseconds: Sequence[float]) -> float | None:
    """Tokens per second from paired (tokens, ms) measurements, token-weighted; None without usable time."""
    total_ms = sum(milliseconds)
    return sum(tokens) / total_ms * 1000.0 if total_ms > 0 else None


@dataclass(slots=True)
class Sample:
    """One measured request of a point."""

    ok: bool
    latency_ms: float
    prompt_tokens: int | None = None  # usage.prompt_tokens
    completion_tokens: int | None = None
    engine_prompt_tokens: int | None = None  # tokens the engine processed (after its prompt cache)
    prompt_ms: float | None = None
    decode_ms: float | None = None
    load_ms: float | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)  # gaps between streamed content chunks
    prompt_estimate: int = 0
    max_tokens: int | None = None
    error_code: str | None = None
    content: str | None = None

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.latency_ms - self.ttft_ms) / (self.completion_tokens - 1)


def _distribution(name: str, values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"{name}_mean": mean(values)}
    for q in QUANTILES:
        out[f"{name}_p{q}"] = percentile(values, q)
    return out


def summarise(samples: Sequence[Sample], wall_seconds: float, *, max_failure_rate: float) -> dict[str, Any]:
    """A point's metrics as a flat dict (the ``BenchPointRow`` metric columns)."""
    done = [s for s in samples if s.ok]
    n_failed = len(samples) - len(done)
    timed_prompt = [s for s in done if s.engine_prompt_tokens is not None and s.prompt_ms]
    timed_decode = [s for s in done if s.completion_tokens is not None and s.decode_ms]
    completion = [float(s.completion_tokens) for s in done if s.completion_tokens is not None]
    prompt = [float(s.prompt_tokens) for s in done if s.prompt_tokens is not None]
    failure_rate = n_failed / len(samples) if samples else 1.0
    out: dict[str, Any] = {
        "n_requests": len(samples), "n_completed": len(done), "n_failed": n_failed,
        "success_rate": 1.0 - failure_rate if samples else 0.0,
        "excluded": failure_rate > max_failure_rate,
        "wall_seconds": wall_seconds,
        "req_per_s": len(done) / wall_seconds if wall_seconds > 0 else 0.0,
        "output_tps": sum(completion) / wall_seconds if wall_seconds > 0 else 0.0,
        "prompt_tps": rate([float(s.engine_prompt_tokens or 0) for s in timed_prompt],
                           [s.prompt_ms or 0.0 for s in timed_prompt]),
        "gen_tps": rate([float(s.completion_tokens or 0) for s in timed_decode],
                        [s.decode_ms or 0.0 for s in timed_decode]),
        "prompt_tokens_mean": mean(prompt),
        "completion_tokens_mean": mean(completion),
    }
    out |= _distribution("latency", [s.latency_ms for s in done])
    out |= _distribution("ttft", [s.ttft_ms for s in done if s.ttft_ms is not None])
    out |= _distribution("tpot", [t for s in done if (t := s.tpot_ms) is not None])
    out |= _distribution("itl", [gap for s in done for gap in s.itl_ms])
    out["errors"] = dict(Counter(s.error_code or "error" for s in samples if not s.ok))
    return out
