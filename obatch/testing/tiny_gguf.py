"""A tiny, deterministic, random-weight llama GGUF for fast engine tests.

The model has 2 layers, a 64-wide residual stream and a byte-level SentencePiece vocabulary (``<unk>``, ``<s>``,
``</s>`` and the 256 ``<0xNN>`` byte tokens), about 0.5 MB on disk. llama.cpp (xllamacpp) loads it in a few
milliseconds and decodes hundreds of tokens per second on one core.

The weights are random (seeded), with one twist so that the output is usable in tests: column 0 of the token
embedding is a large constant, so after the final RMS norm the hidden state always has a big positive first
component; the output projection gives printable-ASCII bytes a positive weight on that component and every other
token (``</s>`` included) a negative one. The model therefore only ever emits printable ASCII text and never stops
on its own: every completion runs to ``max_tokens`` (``usage.completion_tokens == max_tokens``), with no need for
``"ignore_eos"``.

A ChatML chat template is stored in the metadata, so ``/v1/chat/completions`` works.
"""

from __future__ import annotations

from pathlib import Path

from obatch._extras import require

require("local", "gguf", "numpy")

import gguf  # noqa: E402  (after the check: a missing extra is a sentence)
import numpy as np  # noqa: E402

__all__ = ["TINY_ARCH", "TINY_CONTEXT_LENGTH", "TINY_VOCAB_SIZE", "write_tiny_model"]

TINY_ARCH = "llama"
TINY_CONTEXT_LENGTH = 4096
N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
SEED = 1234

_SPECIALS = ["<unk>", "<s>", "</s>"]
_UNK, _BOS, _EOS = 0, 1, 2
TINY_VOCAB_SIZE = len(_SPECIALS) + 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_model(path: Path) -> Path:
    """Write the tiny model to ``path`` (parent directories are created) and return ``path``.

    The same bytes are written every time (seeded weights, fixed metadata).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    def rand(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), TINY_ARCH)
    w.add_name("obatch-tiny-random")
    w.add_context_length(TINY_CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * TINY_VOCAB_SIZE)
    w.add_token_types(types)
    w.add_unk_token_id(_UNK)
    w.add_bos_token_id(_BOS)
    w.add_eos_token_id(_EOS)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    embd = rand(TINY_VOCAB_SIZE, N_EMBD, scale=0.5)
    embd[:, 0] = 8.0  # constant "bias" component that survives to the final norm
    out = rand(TINY_VOCAB_SIZE, N_EMBD, scale=1.0)
    printable = np.zeros(TINY_VOCAB_SIZE, dtype=bool)
    printable[len(_SPECIALS) + 0x20 : len(_SPECIALS) + 0x7F] = True
    out[:, 0] = np.where(printable, 4.0, -4.0)

    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", out)
    for i in range(N_LAYER):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{p}.attn_q.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_k.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_v.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_output.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{p}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_down.weight", rand(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
