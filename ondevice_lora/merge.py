"""`odlora merge`: fold an adapter into the base weights and write a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

from .adapter import Adapter, merge_adapter
from .base import Base
from .hf_checkpoint import write_model_dir


def merge_to_dir(base: Base, adapter: Adapter, out: Path, adapters: tuple[str, ...] = ()) -> None:
    """W' = W + ΔW in fp32 for every adapted linear; the result loads in transformers as is.
    `adapters` (the `DIR:WEIGHT` merged) are recorded in its odlora-model.json."""
    merge_adapter(base.model, adapter)
    tensors = base.model.state_dict()
    if base.model.args.tie_embeddings:
        tensors.pop("lm_head.weight")  # tied: transformers re-ties it from the embeddings
    config = dict(base.config)
    config.pop("quantization_config", None)
    origin = {"merged": {"base": base.spec, "base_fingerprint": base.fingerprint, "adapters": list(adapters)}}
    write_model_dir(Path(out), config, tensors, base.tokenizer, origin)
