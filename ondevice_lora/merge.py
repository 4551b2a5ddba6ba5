"""`odlora merge`: fold an adapter into the base weights and write a Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapter import Adapter, merge_adapter
from .base import Base
from .errors import OdloraError
from .hf_checkpoint import write_model_dir

# --dtype -> (torch dtype, the name transformers' config gives it)
MERGE_DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"),
                "fp16": (torch.float16, "float16")}


def merge_to_dir(base: Base, adapter: Adapter, out: Path, adapters: tuple[str, ...] = (), dtype: str = "fp32") -> None:
    """W' = W + ΔW, computed in fp32 for every adapted linear, written in `dtype`, with the base's
    generation_config.json (or one from its config); the result loads in transformers as is.
    `adapters` (the `DIR:WEIGHT` merged) are recorded in its odlora-model.json."""
    if dtype not in MERGE_DTYPES:
        raise OdloraError(f"{dtype!r} is not one of {', '.join(MERGE_DTYPES)}", param="dtype")
    torch_dtype, dtype_name = MERGE_DTYPES[dtype]
    merge_adapter(base.model, adapter)
    tensors = {name: t.to(torch_dtype) for name, t in base.model.state_dict().items()}
    if base.model.args.tie_embeddings:
        tensors.pop("lm_head.weight")  # tied: transformers re-ties it from the embeddings
    config = {k: v for k, v in base.config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = dtype_name  # transformers >= 4.56 reads `dtype` (older ones `torch_dtype`)
    origin = {"merged": {"base": base.spec, "base_fingerprint": base.fingerprint, "adapters": list(adapters)}}
    write_model_dir(Path(out), config, tensors, base.tokenizer, origin, generation_config(base))


def generation_config(base: Base) -> dict:
    """The base's own generation_config.json when it has one, else what transformers would derive
    from its config (the special tokens), so that `generate()` stops where the base stops."""
    own = base.path / "generation_config.json" if base.path.is_dir() else None
    if own is not None and own.is_file():
        try:
            return json.loads(own.read_text())
        except ValueError:
            raise OdloraError(f"{own}: not JSON") from None
    tokenizer = base.tokenizer
    derived = {"bos_token_id": base.config.get("bos_token_id", tokenizer.bos_token_id),
               "eos_token_id": base.config.get("eos_token_id", tokenizer.eos_token_id),
               "pad_token_id": base.config.get("pad_token_id", tokenizer.pad_token_id)}
    return {"_from_model_config": True, **{k: v for k, v in derived.items() if v is not None}}
