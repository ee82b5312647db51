"""Token estimates and context-window fitting, so that no prompt is ever truncated silently.

Ollama truncates a prompt longer than ``num_ctx`` without an error (the only trace is a smaller
``prompt_eval_count``), and reloads the model whenever ``num_ctx`` changes. So obatch picks ONE ``num_ctx`` per
(batch, model) from the longest prompt estimate plus its output budget, within the model's trained context, and
refuses up front the requests that cannot fit.

Estimates are deliberately generous (about 3 characters per token plus per-message template overhead): an
over-estimate costs a little memory, an under-estimate costs a silently truncated prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 3.0
MESSAGE_OVERHEAD = 8
DEFAULT_OUTPUT_BUDGET = 1024
MIN_NUM_CTX = 2048
NUM_CTX_STEP = 1024


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def estimate_prompt_tokens(url: str, body: dict[str, Any]) -> int:
    """A generous token estimate of the prompt a request sends (messages, prompt or embedding input)."""
    if url == "/v1/chat/completions":
        chars = 0
        messages = body.get("messages") or []
        for message in messages:
            if isinstance(message, dict):
                chars += len(_text_of(message.get("content")))
                if message.get("tool_calls"):
                    chars += len(str(message["tool_calls"]))
        if body.get("tools"):
            chars += len(str(body["tools"]))
        return int(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD * max(1, len(messages)) + 4
    if url == "/v1/responses":  # instructions + input (a string or message items), like a chat
        items = body.get("input")
        messages = [{"content": items}] if isinstance(items, str) else [i for i in items or [] if isinstance(i, dict)]
        if body.get("instructions"):
            messages.append({"content": body["instructions"]})
        chars = sum(len(_text_of(m.get("content", m.get("output", m.get("arguments"))))) for m in messages)
        if body.get("tools"):
            chars += len(str(body["tools"]))
        return int(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD * max(1, len(messages)) + 4
    if url == "/v1/completions":
        return int(len(_text_of(body.get("prompt"))) / CHARS_PER_TOKEN) + 4
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    return max((int(len(_text_of(t)) / CHARS_PER_TOKEN) + 2 for t in texts), default=2)


def output_budget(body: dict[str, Any]) -> int | None:
    """The output tokens a request asked for, or None when it set no limit."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_predict"), int) and options["num_predict"] > 0:
        return int(options["num_predict"])
    return None


def explicit_num_ctx(body: dict[str, Any]) -> int | None:
    """``num_ctx`` set by the request itself (Ollama's ``options.num_ctx``, or a top-level ``num_ctx``)."""
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_ctx"), int):
        return int(options["num_ctx"])
    value = body.get("num_ctx")
    return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True)
class Fit:
    num_ctx: int
    needed: int


def fit_num_ctx(longest_need: int, context_length: int | None) -> Fit:
    """One num_ctx for a (batch, model) group: the smallest step that holds the longest need, within the model."""
    steps = -(-longest_need // NUM_CTX_STEP) * NUM_CTX_STEP
    num_ctx = max(MIN_NUM_CTX, steps)
    if context_length:
        num_ctx = min(num_ctx, context_length)
    return Fit(num_ctx=num_ctx, needed=longest_need)


def need_of(prompt_estimate: int, max_tokens: int | None) -> int:
    return prompt_estimate + (max_tokens if max_tokens is not None else DEFAULT_OUTPUT_BUDGET)


def too_long(prompt_estimate: int, max_tokens: int | None, context_length: int | None) -> str | None:
    """Why a request cannot fit the model's context at all (None when it can)."""
    if not context_length:
        return None
    if prompt_estimate >= context_length:
        return (f"The prompt (about {prompt_estimate} tokens) does not fit the model's context length of "
                f"{context_length} tokens.")
    if max_tokens is not None and prompt_estimate + max_tokens > context_length:
        return (f"The prompt (about {prompt_estimate} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context length of {context_length} tokens.")
    return None


def looks_truncated(prompt_tokens: int | None, num_ctx: int | None, prompt_estimate: int) -> bool:
    """True when the engine's prompt count suggests it cut the prompt to fit ``num_ctx``."""
    if prompt_tokens is None or not num_ctx:
        return False
    filled = prompt_tokens >= num_ctx - 4
    return filled and prompt_estimate >= prompt_tokens
