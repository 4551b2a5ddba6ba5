"""Our adapters (PEFT format) as llama.cpp LoRA adapters: a GGUF file beside the base's own GGUF.

    from ondevice_lora.adapter import load_adapter
    from ondevice_lora.adapter_gguf import write_lora_gguf
    write_lora_gguf(load_adapter("my-adapter"), base.config, "my-adapter.gguf")
    # llama.cpp: llama-cli -m base.gguf --lora my-adapter.gguf
    # llama-cpp-python: Llama(model_path="base.gguf", lora_path="my-adapter.gguf")

The file follows llama.cpp's own converter (convert_lora_to_gguf.py):

    general.architecture     the base's (llama.cpp refuses an adapter made for another one)
    general.type             "adapter"
    adapter.type             "lora"
    adapter.lora.alpha       float32; llama.cpp scales by alpha / r (alpha 0: by 1)
    blk.{i}.attn_q.weight.lora_a   A (r, in)       per adapted linear, named after the base's
    blk.{i}.attn_q.weight.lora_b   B (out, r)      tensor (shapes in numpy order; GGUF lists them
                                                   innermost first)

Two details decide whether llama.cpp computes the same ΔW = s · B A as we do:

- llama.cpp's base converter permutes the rows of Llama's q/k weights (each head's two rotary
  halves interleaved, for its RoPE kernel); `gguf_checkpoint` undoes that when we read a GGUF
  base. The adapter must follow the base's layout, and a row permutation of ΔW is one of B's rows.
- llama.cpp has one alpha per file and divides it by each tensor's rank. When every module's
  scale is alpha / r (plain LoRA) the file keeps PEFT's B and alpha, as llama.cpp's converter
  would; otherwise (rsLoRA, PEFT's alpha_pattern) each module's scale is folded into its B and
  alpha is written as 0.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .adapter import Adapter
from .errors import OdloraError
from .gguf_checkpoint import _LAYER_NAMES, ARCHITECTURES

DTYPES = {"f32": np.float32, "f16": np.float16}
_GGUF_LAYER_NAMES = {hf: gguf for gguf, hf in _LAYER_NAMES.items()}  # "self_attn.q_proj" -> "attn_q"


def gguf_tensor_name(module: str) -> str:
    """The base tensor a module's LoRA factors attach to: `model.layers.3.self_attn.q_proj` ->
    `blk.3.attn_q.weight`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if not m or m[2] not in _GGUF_LAYER_NAMES:
        raise OdloraError(f"adapter module {module}: llama.cpp LoRA export covers the decoder layers' linears only")
    return f"blk.{m[1]}.{_GGUF_LAYER_NAMES[m[2]]}.weight"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order for Llama q/k (its converter's `permute`): per head, rows
    [0, 2, 4, ..., 1, 3, 5, ...] of the rotary halves interleaved. Inverse of
    `gguf_checkpoint._unpermute_qk`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_alpha(adapter: Adapter) -> tuple[float, bool]:
    """(adapter.lora.alpha, fold): PEFT's alpha when every module's scale is alpha / r, else 0
    with each module's scale to be folded into its B."""
    alpha = float(adapter.config.alpha)
    plain = all(math.isclose(adapter.scalings[n], alpha / a.shape[0], rel_tol=1e-6) for n, a in adapter.A.items())
    return (alpha, False) if plain else (0.0, True)


def write_lora_gguf(adapter: Adapter, config: dict, out, dtype: str = "f32") -> dict:
    """Write `adapter` as a llama.cpp LoRA GGUF for the base whose config.json dict is `config`.

    Args:
        adapter: PEFT-format factors (`adapter.load_adapter`).
        config: the base's Hugging Face config (`Base.config`): architecture and head counts.
        out: the .gguf file; written beside itself first, then renamed into place.
        dtype: "f32" or "f16" for the factors.
    Returns:
        {"alpha", "folded", "tensors", "bytes"}.
    Raises:
        OdloraError: an architecture llama.cpp's GGUF names do not cover here, a module outside
            the decoder layers, an unknown dtype.
    """
    import gguf

    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise OdloraError(f"llama.cpp LoRA export: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    if dtype not in DTYPES:
        raise OdloraError(f"llama.cpp LoRA export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    n_heads = int(config["num_attention_heads"])
    heads = {"q_proj": n_heads, "k_proj": int(config.get("num_key_value_heads") or n_heads)}
    alpha, fold = file_alpha(adapter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURES[arch])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module in sorted(adapter.A, key=_layer_order):
            name, kind = gguf_tensor_name(module), module.rsplit(".", 1)[1]
            A, B = adapter.A[module].float(), adapter.B[module].float()
            if fold:
                B = B * adapter.scalings[module]
            if arch == "llama" and kind in heads:  # llama.cpp's Llama converter permutes q/k only
                B = permute_qk(B, heads[kind])
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(A.numpy().astype(DTYPES[dtype])))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(B.numpy().astype(DTYPES[dtype])))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"alpha": alpha, "folded": fold, "tensors": 2 * len(adapter.A), "bytes": out.stat().st_size}


def _layer_order(module: str) -> tuple:
    m = re.match(r"model\.layers\.(\d+)\.", module)
    return (int(m[1]) if m else -1, module)
