"""Attention in the ONNX export as one ONNX Runtime node: `com.microsoft.GroupQueryAttention`.

One node per layer does RoPE, the KV-cache update, grouped-query attention over only the filled
positions, and the causal mask. The plain graph took ~30 nodes per layer for the same maths, copied
each layer's whole cache per step (ScatterElements: present = past + T rows) and attended over all
max_seq_len positions. With `past_key` and `present_key` bound to one buffer (IO binding, as
`runtime/onnx.py` does) the node writes the new rows in place; run without binding, it returns a
copy of the same shape, so a plain `session.run` that feeds present back as past is still right.

    torch side   torch.ops.odlora.group_query_attention(q, k, v, past_k, past_v, input_pos, cos, sin,
                                                        n_heads, n_kv_heads) -> (y, present_k, present_v)
                 a custom op that torch.export keeps as one node; its eager body is the reference maths
                 (llama.py's RoPE and attention), which the tests hold ONNX Runtime's kernel to
    ONNX side    TRANSLATIONS, for torch.onnx.export(custom_translation_table=...)

    q (1, T, n_heads * hd), k and v (1, T, n_kv_heads * hd)      projections, before RoPE
    past_k, past_v (1, n_kv_heads, max_seq_len, hd)               the cache; rows < input_pos[0] filled
    input_pos (T,) int64                                          contiguous positions of this call
    cos, sin (max_seq_len, hd / 2)                                RoPE tables (the rotate-half layout)

ONNX Runtime's CPU kernel needs head_dim to be a multiple of 16 (`check_head_dim`).
"""

from __future__ import annotations

import torch

from ..errors import OdloraError
from ..models.llama import apply_rope, repeated_kv_attention

DOMAIN = "com.microsoft"
INT32 = 6  # onnx.TensorProto.INT32


@torch.library.custom_op("odlora::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, _ = q.shape
    hd = past_k.shape[-1]
    q = q.view(B, T, n_heads, hd).transpose(1, 2)  # (B, heads, T, hd)
    k = k.view(B, T, n_kv_heads, hd).transpose(1, 2)
    v = v.view(B, T, n_kv_heads, hd).transpose(1, 2)
    c = torch.cat([cos[input_pos], cos[input_pos]], dim=-1)  # (T, hd), as llama.py's rope tables
    s = torch.cat([sin[input_pos], sin[input_pos]], dim=-1)
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    present_k, present_v = past_k.index_copy(2, input_pos, k), past_v.index_copy(2, input_pos, v)
    mask = torch.arange(past_k.shape[2])[None, :] <= input_pos[:, None]  # (T, max_seq_len)
    y = repeated_kv_attention(q, present_k, present_v, mask[None, None])
    return y.transpose(1, 2).reshape(B, T, -1), present_k, present_v


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, input_pos, cos, sin, n_heads, n_kv_heads):
    return q.new_empty(q.shape), past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)


def register_onnx_schema() -> None:
    """Tell onnx (and so onnxscript) the contrib op's signature, the part of it that we use."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GroupQueryAttention", 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    param, attribute = OpSchema.FormalParameter, OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", DOMAIN, 1,
        inputs=[param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
        + [param("seqlens_k", "M"), param("total_sequence_length", "M"), param("cos_cache", "T"), param("sin_cache", "T")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attribute(n, OpSchema.AttrType.INT, "") for n in ("num_heads", "kv_num_heads", "do_rotary",
                                                                      "rotary_interleaved")],
    ))


def onnx_group_query_attention(q, k, v, past_k, past_v, input_pos, cos, sin, n_heads: int, n_kv_heads: int):
    """The translation: GroupQueryAttention reads the positions as seqlens_k (the last position,
    per sequence) and total_sequence_length (last + 1); a call's positions are contiguous."""
    from onnxscript import opset21 as op
    from onnxscript.values import Opset

    last = op.ReduceMax(input_pos, keepdims=1)  # (1,)
    total = op.Cast(op.Squeeze(op.Add(last, op.Constant(value_int=1))), to=INT32)
    return Opset(DOMAIN, 1).GroupQueryAttention(q, k, v, past_k, past_v, op.Cast(last, to=INT32), total, cos, sin,
                                                num_heads=n_heads, kv_num_heads=n_kv_heads, do_rotary=1,
                                                rotary_interleaved=0)


def translations() -> dict:
    register_onnx_schema()
    return {torch.ops.odlora.group_query_attention.default: onnx_group_query_attention}


def check_head_dim(head_dim: int) -> None:
    if head_dim % 16:
        raise OdloraError(f"the onnx export needs a head dimension that is a multiple of 16 (ONNX Runtime's "
                          f"GroupQueryAttention kernel); this base's is {head_dim}")
