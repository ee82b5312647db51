"""Benchmark workloads: what requests a point sends — their prompt and output lengths, reproducibly.

A workload is a named built-in (``WORKLOADS``), an inline spec (``"prompt=64-512,output=32-128"``, optionally
``,dist=lognormal``), or an OpenAI batch input file (its own requests, in file order, cycled when more are asked
for). Generated prompts are ordinary English sentences drawn at random, about ``4 × prompt_tokens`` characters (English
BPE tokenizers and the simulator both count about 4 characters per token; the engine's own count is what gets
stored), numbered so that no two share more than the chat template as a cached prefix, asking for
``max_tokens`` of output with ``ignore_eos`` so that llama.cpp (and vLLM) generate exactly that many tokens —
engines that ignore the flag (Ollama) stop where they like, and the measured counts say so.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from obatch import context, errors
from obatch.jsonl import Request, iter_file

Dist = Literal["uniform", "lognormal"]
CHARS_PER_TOKEN = 4

_SENTENCES = (
    "The river runs past the old mill and under a stone bridge before it reaches the town.",
    "Every morning the baker opens the shop at six and sells fresh bread to the workers.",
    "A small library on the hill keeps letters, maps and records from three centuries.",
    "The engineers measured the wind for a year before they chose a place for the turbines.",
    "When the winter came early, the farmers moved their sheep down from the high meadows.",
    "Children in the village learn to swim in the lake during the long summer holidays.",
    "The market square fills with stalls of fruit, cheese, honey and hand-made baskets.",
    "Scientists at the station collect samples of ice to study the climate of the past.",
    "The lighthouse keeper wrote in his journal about every ship that passed the rocks.",
    "Trains leave the central station every twenty minutes for the coast and the mountains.",
    "The museum shows clocks, compasses and instruments that sailors used to find their way.",
    "After the storm, volunteers repaired the roof of the school and cleared the roads.",
    "Bees visit the orchard in spring, and the apples are ready to pick in the autumn.",
    "The company tested the new battery in cold weather and in the heat of the desert.",
    "Copper wires carry the signal from the tower to every house in the valley.",
    "Her grandmother kept a recipe book with notes written in the margins of each page.",
    "The hikers followed the path along the canyon until they reached a quiet lake.",
    "In the evening the town lights the lanterns along the harbour and the fishing boats return.",
    "The report explains how the city plans to reduce traffic and improve the air.",
    "Students built a small robot that sorts coloured blocks and counts them aloud.",
)
_SPEC = re.compile(r"^(\w+)=([\w.-]+)$")


@dataclass(frozen=True, slots=True)
class Lengths:
    """A token-length distribution: uniform on [low, high], or log-normal centred in it and clipped to it."""

    low: int
    high: int
    dist: Dist = "uniform"

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise errors.ConfigError(f"A length range needs 1 <= low <= high, got {self.low}-{self.high}.")

    def sample(self, rng: random.Random) -> int:
        if self.low == self.high:
            return self.low
        if self.dist == "lognormal":
            centre = math.log(math.sqrt(self.low * self.high))
            spread = math.log(self.high / self.low) / 4  # the range is about ±2 sigma
            return min(self.high, max(self.low, round(math.exp(rng.gauss(centre, spread)))))
        return rng.randint(self.low, self.high)

    @classmethod
    def parse(cls, text: str, dist: Dist = "uniform") -> Lengths:
        low, _, high = text.partition("-")
        try:
            return cls(int(low), int(high or low), dist)
        except ValueError as exc:
            raise errors.ConfigError(f"A length range looks like '64' or '64-512', got {text!r}.") from exc


@dataclass(slots=True)
class BenchRequest:
    url: str
    body: dict[str, Any]
    prompt_estimate: int
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class Workload:
    """What a point sends. ``file`` workloads take their requests from a batch file instead of generating them."""

    name: str
    prompt: Lengths = Lengths(32, 256)
    output: Lengths = Lengths(32, 128)
    file: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def requests(self, model: str, n: int, *, seed: int) -> list[BenchRequest]:
        """``n`` requests for ``model``; the same (workload, n, seed) always gives the same requests."""
        if self.file is not None:
            return _file_requests(Path(self.file), model, n)
        rng = random.Random(f"{self.name}|{seed}")
        out = []
        for i in range(n):
            prompt_tokens, max_tokens = self.prompt.sample(rng), self.output.sample(rng)
            text = f"Request {i}. Read these notes, then continue them: " + _text(rng, prompt_tokens)
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                                    "max_tokens": max_tokens, "temperature": self.temperature, "seed": seed + i}
            if self.ignore_eos:
                body["ignore_eos"] = True
            out.append(BenchRequest("/v1/chat/completions", body,
                                    context.estimate_prompt_tokens("/v1/chat/completions", body), max_tokens))
        return out


def _text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of English: sentences drawn at random, the last one cut to fit."""
    target = tokens * CHARS_PER_TOKEN
    parts: list[str] = []
    size = 0
    while size < target:
        sentence = rng.choice(_SENTENCES)
        parts.append(sentence[: target - size])
        size += len(sentence) + 1
    return " ".join(parts)


def _file_requests(path: Path, model: str, n: int) -> list[BenchRequest]:
    with path.open("rb") as handle:
        found = [item for item in iter_file(handle, model=model) if isinstance(item, Request)]
    if not found:
        raise errors.ConfigError(f"{path} holds no valid batch requests.")
    count = n or len(found)
    return [BenchRequest(r.url, r.body, context.estimate_prompt_tokens(r.url, r.body), context.output_budget(r.body))
            for r in (found[i % len(found)] for i in range(count))]


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        Workload("tiny", Lengths(8, 24), Lengths(4, 16)),
        Workload("short", Lengths(16, 64), Lengths(16, 64)),
        Workload("chat", Lengths(32, 512, "lognormal"), Lengths(32, 192)),
        Workload("long-prompt", Lengths(512, 1536), Lengths(32, 96)),
        Workload("long-output", Lengths(32, 96), Lengths(256, 512)),
    )
}


def parse_workload(spec: str) -> Workload:
    """A built-in name, an inline ``prompt=A-B,output=C-D[,dist=lognormal]`` spec, or a batch file path."""
    if spec in WORKLOADS:
        return WORKLOADS[spec]
    if "=" in spec:
        fields: dict[str, str] = {}
        for part in spec.split(","):
            match = _SPEC.match(part.strip())
            if not match or match.group(1) not in ("prompt", "output", "dist"):
                raise errors.ConfigError(f"Workload specs look like 'prompt=64-512,output=32-128', got {spec!r}.")
            fields[match.group(1)] = match.group(2)
        dist = fields.get("dist", "uniform")
        if dist not in ("uniform", "lognormal"):
            raise errors.ConfigError(f"dist must be uniform or lognormal, got {dist!r}.")
        chosen: Dist = "lognormal" if dist == "lognormal" else "uniform"
        return Workload(spec, Lengths.parse(fields.get("prompt", "32-256"), chosen),
                        Lengths.parse(fields.get("output", "32-128"), chosen))
    path = Path(spec)
    if path.is_file():
        return Workload(path.name, file=str(path.resolve()))
    raise errors.ConfigError(f"Unknown workload {spec!r}: use one of {', '.join(WORKLOADS)}, "
                             "an inline 'prompt=64-512,output=32-128' spec, or a batch file path.")
