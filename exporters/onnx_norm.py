"""RMSNorm in the ONNX export as one ONNX Runtime node: `SimplifiedLayerNormalization`.

Exported as plain ops, each RMSNorm is seven nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul,
Mul) that ONNX Runtime does not fuse: its SimplifiedLayerNormFusion looks for a Div where torch's
rsqrt leaves a Reciprocal. As one node, ORT's SkipLayerNormFusion then also folds the residual Add
in front of it (SkipSimplifiedLayerNormalization). A decode step is short enough that the number of
nodes counts: 2 norms x 7 nodes per layer were ~14% of the int4 graph's nodes.

    torch side   torch.ops.odlora.rms_norm(x, weight, eps): a custom op whose eager body is the
                 model's own RMSNorm (llama.py), which the tests hold ONNX Runtime's kernel to
    ONNX side    translations(), for torch.onnx.export(custom_translation_table=...)

The op is ONNX Runtime's (registered in the ONNX domain, opset 1); `register_onnx_schema` tells
onnx its signature so that onnxscript can build and check the node.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.llama import RMSNorm


@torch.library.custom_op("odlora::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


class FusedRMSNorm(RMSNorm):
    """The same norm (weight and eps), as the one-node custom op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.odlora.rms_norm(x, self.weight, self.eps)


def replace_norms_with_fused(model: nn.Module) -> None:
    """Every `RMSNorm` of `model` becomes a `FusedRMSNorm`, in place (same parameters)."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm


def register_onnx_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except onnx.defs.SchemaError:
        pass
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[param("X", "T"), param("scale", "T")], outputs=[param("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "")],
    ))


def onnx_rms_norm(x, weight, eps: float):
    from onnxscript.values import Opset

    return Opset("", 1).SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps)


def translations() -> dict:
    register_onnx_schema()
    return {torch.ops.odlora.rms_norm.default: onnx_rms_norm}
