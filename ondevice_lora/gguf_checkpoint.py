"""Read a GGUF file (llama.cpp's format) into a Hugging Face-style config and fp32 tensors.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised with the `gguf` package; the tokenizer
and chat template are rebuilt from the file's metadata by `transformers`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .errors import OdloraError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF tensor name -> Hugging Face name; `{i}` is the block index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    stem, kind = gguf_name.rsplit(".", 1)  # kind: weight | bias
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
        if m[2] in _LAYER_NAMES:
            return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{kind}"
    elif stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise OdloraError(f"GGUF tensor {gguf_name!r} has no counterpart in our model")


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's rotary halves for Llama q/k weights;
    # undo it so the weights match the "rotate half" RoPE layout.
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise OdloraError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on damage
        raise OdloraError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config.json-style dict, fp32 tensors with Hugging Face names)."""
    from gguf.quants import dequantize

    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise OdloraError(f"{path}: unsupported architecture model_type={arch!r} (supported: {', '.join(ARCHITECTURES)})")
    config = _config(reader, arch, path)
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise OdloraError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported yet")
        name = _hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as e:
            raise OdloraError(f"{path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from None
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            w = _unpermute_qk(w, heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:
            # An F32 tensor is a view of the read-only memory map: without a copy the model's
            # weights would live in the mapping, and an in-place update (a LoRA merge) segfaults.
            w = w.copy()
        tensors[name] = torch.from_numpy(w)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return config, tensors


def _config(reader, arch: str, path: Path) -> dict:
    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    try:
        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        config = {
            "model_type": ARCHITECTURES[arch],
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
            "head_dim": int(get("attention.key_length", hidden // n_heads)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 2048)),
            "vocab_size": int(get("vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])))),
            "hidden_act": "silu",
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        }
    except (TypeError, ValueError) as e:
        raise OdloraError(f"{path}: GGUF metadata for {arch} is incomplete ({e})") from None
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return config


def read_gguf_tokenizer(path: Path):
    """A `transformers` tokenizer (with chat template) rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise OdloraError(f"{path}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e})") from None
