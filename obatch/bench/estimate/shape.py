"""A workload as the cost model reads it: each request's prompt and answer tokens, in run order, and the share of
its prompt the engine's prefix cache already holds.

Prompt lengths of a batch file come from obatch's text estimate (``obatch.context``) mapped to the engine's token
counts by a straight line (``TokenCalibration``, fitted in ``obatch.bench.estimate.calibrate``). Answer lengths come
from what the model's answers really took (``obatch.bench.answers``: a pilot of the file, finished batches, natural
benchmark requests): a request with cap ``m`` expects ``E[min(X, m)]``, one without a cap ``E[X]``, where answers
that run on to the context stop at the context left at the num_ctx the batch will run with. Where nothing is known,
the cap (or 256 tokens) is assumed.

``cached`` is the share of a prompt the engine's prefix cache already holds: benchmark prompts are all distinct,
while real batches often repeat a system prompt or a document, which llama.cpp (and Ollama, and vLLM) do not
process again; it is estimated per request as the mean common prefix with the ``c`` requests sent before it.

A file of any size is read in bounded memory (``Lines``: every line up to ``SAMPLE``, beyond that a uniform random
sample), the same way whether it is read before it is submitted or from the store at the batch's start.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from obatch import context, errors
from obatch.bench.answers import UNBOUNDED_OUTPUT, AnswerLengths
from obatch.bench.estimate.replay import cached_shares as cached_shares  # importable from here too
from obatch.bench.estimate.replay import common_prefix as common_prefix
from obatch.bench.estimate.replay import grouped, run_shares
from obatch.jsonl import Request, iter_file
from obatch.prefix import prefix_key
from obatch.schedule import expected_length
from obatch.store import pilots

SHARE_SAMPLE = 2000  # prompts per model read to estimate the prefix-cache share (the rest take their mean)
SAMPLE = 4000  # lines per model an estimate reads at most; beyond that a uniform random sample of this many


@dataclass(slots=True)
class Shape:
    """A workload to estimate: each request's prompt and output tokens, in run order."""

    prompt_tokens: list[float]
    output_tokens: list[float]
    cached: list[float] | None = None  # share of each prompt the engine's prefix cache already holds (0-1)
    notes: list[str] = field(default_factory=list)
    count: int | None = None  # set: the workload is this many copies of the one request listed
    caps: list[int | None] | None = None  # each request's max_tokens, when its output is drawn from ``answers``
    answers: AnswerLengths | None = None  # what the model's answers are known to take
    sampled: int | None = None  # set: the listed requests are a uniform random sample of this many
    rooms: list[float | None] | None = None  # each request's context left at the num_ctx it runs with (None: unknown)
    longest: float = 0.0  # the context the longest request needs (it may not be among a sample's)
    schedule: str | None = None  # the order the shares were replayed for ("auto", "file"; None: not asked)

    def requests(self) -> list[tuple[float, float, float]]:
        """(prompt tokens, output tokens, cached share) per listed request."""
        cached = self.cached or [0.0] * len(self.prompt_tokens)
        return list(zip(self.prompt_tokens, self.output_tokens, cached, strict=True))

    @classmethod
    def uniform(cls, num_requests: int, prompt_tokens: float, output_tokens: float) -> Shape:
        """``num_requests`` equal requests, held as one (the estimate's cost does not grow with their number)."""
        if num_requests < 1 or prompt_tokens < 0 or output_tokens < 0:
            raise errors.ConfigError("num_requests must be positive and token lengths non-negative.")
        return cls([float(prompt_tokens)], [float(output_tokens)], count=num_requests)

    @property
    def n(self) -> int:
        return self.count if self.count is not None else self.sampled or len(self.prompt_tokens)

    @property
    def scale(self) -> float:
        """Running time of the whole workload per running time of the requests listed (a sample's N/n)."""
        return self.sampled / len(self.prompt_tokens) if self.sampled and self.prompt_tokens else 1.0

    @property
    def need(self) -> int:
        """The context the longest request needs (prompt + output)."""
        return int(max(self.longest, *(p + o for p, o in zip(self.prompt_tokens, self.output_tokens, strict=True)),
                       0.0))

    @property
    def cached_tokens(self) -> float:
        """The prompt tokens the engine is expected to take from its prefix cache, over the whole workload."""
        return sum(p * c for p, _, c in self.requests()) * self.scale * (self.count or 1)

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_tokens) / len(self.prompt_tokens) if self.prompt_tokens else 0.0

    @property
    def mean_output(self) -> float:
        return sum(self.output_tokens) / len(self.output_tokens) if self.output_tokens else 0.0


@dataclass(frozen=True, slots=True)
class TokenCalibration:
    """Maps obatch's text estimate to the engine's prompt tokens, and max_tokens to expected output tokens."""

    slope: float = 1.0
    intercept: float = 0.0
    output_fill: float = 1.0
    unbounded_output: float = UNBOUNDED_OUTPUT
    answers: AnswerLengths | None = None  # learnt answer lengths; when known they replace the two above
    cache_kept: float = 1.0  # how much of a repeated prompt prefix the engine really skipped (finished batches)

    def prompt(self, estimate: int) -> float:
        return max(1.0, self.slope * estimate + self.intercept)

    def output(self, max_tokens: int | None, room: float | None = None) -> float:
        """Expected output tokens of a request; ``room``: the context left for its answer (an answer the context
        cuts ends there)."""
        if self.answers is not None and self.answers.known:
            return self.answers.expected(max_tokens, room)
        guess = self.unbounded_output if max_tokens is None else max_tokens * self.output_fill
        return min(guess, room) if room is not None and room > 0 else guess


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def prompt_text(url: str, body: dict[str, Any]) -> str:
    """The text a request sends, in order (what an engine's prefix cache compares)."""
    if url == "/v1/chat/completions":
        return "\n".join(f"{m.get('role')}:{_text(m.get('content'))}"
                         for m in body.get("messages") or [] if isinstance(m, dict))
    return _text(body.get("prompt") if url == "/v1/completions" else body.get("input"))


@dataclass(frozen=True, slots=True)
class Line:
    """What an estimate needs of one request: obatch's prompt estimate, its cap and its endpoint."""

    prompt: int
    max_tokens: int | None
    url: str = "/v1/chat/completions"


@dataclass(slots=True)
class Lines:
    """One model's requests as an estimate reads them, in bounded memory however long the file: every line up to
    ``limit`` of them, beyond that a uniform random sample of ``limit`` (a reservoir with a fixed seed, kept in
    file order, so the same lines give the same sample whichever path reads them: the file before it is submitted,
    the store at the batch's start). What must hold for all of them is counted as they pass: how many, how many
    without a cap, the longest, the endpoints. The prompt texts of the first ``SHARE_SAMPLE`` lines and their
    prefix keys (``obatch.prefix``; ``keys``, when read) tell how much of a prompt the engine's prefix cache holds
    in the order the batch runs them (``obatch.bench.estimate.replay``)."""

    limit: int = field(default_factory=lambda: SAMPLE)
    count: int = 0
    uncapped: int = 0
    longest: Line | None = None
    need: int = 0  # the longest line's prompt + output budget (``context.need_of``): what picks the num_ctx
    urls: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    keys: list[int | None] = field(default_factory=list)  # the texts' prefix keys (empty: not read)
    kept: list[tuple[int, Line]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random("obatch-estimate-sample"))

    @classmethod
    def of(cls, lines: Iterable[Line], texts: Sequence[str] = (), *, limit: int | None = None,
           keys: Sequence[int | None] = ()) -> Lines:
        made = cls() if limit is None else cls(limit=limit)
        for line in lines:
            made.add(line)
        made.texts, made.keys = list(texts), list(keys)
        return made

    def read(self, url: str, body: dict[str, Any]) -> None:
        """Keep a line's prompt text and prefix key (the first ``SHARE_SAMPLE`` lines', in line order)."""
        if len(self.texts) < SHARE_SAMPLE:
            self.texts.append(prompt_text(url, body))
            self.keys.append(prefix_key(url, body))

    def add(self, line: Line) -> None:
        need = context.need_of(line.prompt, line.max_tokens)
        if self.longest is None or need > self.need:
            self.longest, self.need = line, need
        self.uncapped += line.max_tokens is None
        self.urls.add(line.url)
        if self.count < self.limit:
            self.kept.append((self.count, line))
        elif (slot := self.rng.randrange(self.count + 1)) < self.limit:  # Algorithm R
            self.kept[slot] = (self.count, line)
        self.count += 1

    @property
    def sampled(self) -> bool:
        return self.count > len(self.kept)

    def sample(self) -> list[Line]:
        """The lines kept (all of them, or the sample), in file order."""
        return [line for _, line in sorted(self.kept, key=lambda kept: kept[0])]


def prefix_cached(repeated: Sequence[float], n: int, kept: float, *, in_order: bool = True
                  ) -> tuple[list[float], float]:
    """Each of ``n`` requests' share of its prompt the engine skips (``repeated``: ``cached_shares`` of the texts
    read, times ``kept``, how much of it the engine really skipped), and their mean: requests beyond the texts read
    take the mean, and so do all of them when they are a random sample (``in_order`` False: neighbours in a sample
    are not neighbours in the run)."""
    shares = [share * kept for share in repeated]
    typical = sum(shares) / len(shares) if shares else 0.0
    cached = shares[:n] if in_order else []
    return cached + [typical] * (n - len(cached)), typical


def shape_of(lines: Lines, calibration: TokenCalibration, *, window: int = 4, num_ctx: int | None = None,
             schedule: str = "file") -> Shape:
    """A model's lines → a Shape in engine tokens. The first lines have their own prefix-cache share (of the
    texts read), the others the mean of those; a sample's lines all take that mean (neighbours in a sample are
    not neighbours in the run). ``num_ctx``: the context window the batch runs with, which ends an answer that
    runs on to it (``num_ctx`` − its prompt). ``schedule``: the order the batch runs its lines in; under
    ``"auto"``, where the lines read form prefix groups, the shares and the order are the scheduler's, replayed
    at ``window`` slots (``obatch.bench.estimate.replay``); else the file's order (``cached_shares``)."""
    sample = lines.sample()
    read = len(lines.texts)
    lengths = [expected_length(x.prompt, x.max_tokens, context.DEFAULT_OUTPUT_BUDGET) for x in sample[:read]]
    order, repeated = run_shares(lines.texts, lines.keys, lengths, window, schedule)
    groups = grouped(lines.keys) if order is not None else 0
    if order is not None and not lines.sampled:  # the lines read run in the scheduler's order
        sample = [sample[i] for i in order] + sample[read:]
    cached, typical = prefix_cached(repeated, len(sample), calibration.cache_kept, in_order=not lines.sampled)
    prompts = [calibration.prompt(x.prompt) for x in sample]

    def room(prompt: float) -> float | None:
        return max(1.0, num_ctx - prompt) if num_ctx else None

    rooms = [room(p) for p in prompts]
    shape = Shape(prompts, [calibration.output(x.max_tokens, r) for x, r in zip(sample, rooms, strict=True)], cached,
                  rooms=rooms)
    if lines.sampled and lines.longest is not None:
        shape.sampled = lines.count
        longest = calibration.prompt(lines.longest.prompt)
        shape.longest = longest + calibration.output(lines.longest.max_tokens, room(longest))
        shape.notes.append(f"estimated on a uniform random sample of {len(sample)} of the {lines.count} lines")
    if calibration.answers is not None:
        shape.caps, shape.answers = [x.max_tokens for x in sample], calibration.answers
        shape.notes.extend(calibration.answers.notes(lines.count - lines.uncapped, lines.uncapped))
    elif lines.uncapped:
        shape.notes.append(f"requests without max_tokens assumed to answer {calibration.unbounded_output:.0f} "
                           "tokens")
    shape.schedule = schedule
    if groups:
        shape.notes.append(f"schedule auto: {groups} prefix group(s) among the first {len(lines.texts)} lines; a "
                           "group's lines run one after another on one slot, so after its first line the shared "
                           "prefix is in that slot's cache")
    if typical >= 0.05 or groups:
        total = sum(prompts) * shape.scale
        shape.notes.append(f"about {shape.cached_tokens:.0f} of {total:.0f} prompt tokens "
                           f"({shape.cached_tokens / max(total, 1.0):.0%}) expected from the engine's prefix cache "
                           f"(schedule {schedule}): only the rest is charged prompt processing")
    if calibration.cache_kept < 0.95 and sum(repeated) >= 0.05 * len(repeated) > 0:
        shape.notes.append(f"finished batches show the engine skipped only {calibration.cache_kept:.0%} of the "
                           "prompt prefixes it had just seen: the rest is charged as processed again")
    return shape


def file_rows(path: Path, model: str | None = None, *, done: set[tuple[str, str]] | None = None
              ) -> tuple[dict[str, Lines], dict[str, int]]:
    """The valid requests of a batch file by model (``Lines``: bounded, whatever the file's size; blocking: use a
    thread), leaving out those whose (custom_id, body sha256) is in ``done`` (a pilot ran them: the batch will take
    them as finished), and how many were left out per model."""
    groups: dict[str, Lines] = defaultdict(Lines)
    skipped: dict[str, int] = defaultdict(int)
    with path.open("rb") as handle:
        for r in iter_file(handle, model=model):
            if not isinstance(r, Request):
                continue
            if done and (r.custom_id, pilots.body_sha256(orjson.dumps(r.body))) in done:
                skipped[r.model] += 1
                continue
            group = groups[r.model]
            group.read(r.url, r.body)
            group.add(Line(context.estimate_prompt_tokens(r.url, r.body), context.output_budget(r.body), r.url))
    return dict(groups), dict(skipped)
