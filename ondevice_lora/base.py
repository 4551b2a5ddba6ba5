"""Load a base model from a BASE spec: a Hugging Face directory, a .gguf file, a registered name or
a Hugging Face model id in the hub's local cache (`hub.py`).

    base = load_base("smollm2-135m-instruct")     # or "path/to/hf_dir", "model.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M"
    base.model, base.tokenizer, base.fingerprint

The model comes back frozen (no gradients), in eval mode, in `dtype` (fp32 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import hub, registry
from .errors import OdloraError
from .fingerprint import cached_fingerprint, fingerprint_tensors
from .gguf_checkpoint import read_gguf, read_gguf_tokenizer
from .hf_checkpoint import read_config, read_tensors, weight_files, write_model_dir
from .models import family_for


@dataclass
class Base:
    spec: str  # what the user asked for
    path: Path  # directory or .gguf file the weights came from
    config: dict  # Hugging Face config.json dict
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer, with chat template when the base has one
    fingerprint: str

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def resolve(spec: Optional[str]) -> Path:
    """Turn a BASE spec into the directory or .gguf file to read."""
    spec = spec or registry.DEFAULT_BASE
    path = Path(spec).expanduser()
    if path.is_dir() or path.suffix == ".gguf":
        return path
    if spec in registry.REGISTRY:
        if not registry.is_pulled(spec):
            raise OdloraError(f"base {spec!r} is not pulled yet: run `odlora base pull {spec}`")
        return registry.base_dir(spec)
    if hub.is_hub_id(spec) and not path.exists():
        snapshot = hub.cached_snapshot(spec)
        if snapshot is None:
            raise OdloraError(f"{spec}: no such directory, and no model {spec} in the Hugging Face cache: "
                              f"`odlora base pull {spec}` downloads it")
        return snapshot
    if "/" in spec or path.exists():
        raise OdloraError(f"{spec}: no such directory (a base is a model directory, a .gguf file, a registered name "
                          f"or a Hugging Face model id)")
    raise OdloraError(f"unknown base name {spec!r} (registered: {', '.join(registry.REGISTRY)}; or give a model "
                      f"directory, a .gguf file or a Hugging Face model id)")



def _family(config: dict, source: Path):
    try:
        return family_for(config.get("model_type"))
    except ValueError as e:  # an architecture we do not implement is bad user input
        raise OdloraError(f"{source}: {e}") from None


def build_model(config: dict, tensors: dict[str, torch.Tensor], source: Path, dtype=torch.float32):
    """Instantiate our model for `config` and fill it with `tensors` (names checked)."""
    family = _family(config, source)
    try:
        args = family.ModelArgs.from_hf_config(config)
    except (KeyError, ValueError) as e:
        raise OdloraError(f"{source}: {e if isinstance(e, ValueError) else f'config lacks {e}'}") from None
    with torch.device("meta"):  # skip random init: every weight is about to be replaced
        model = family.Model(args)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "lm_head.weight")}
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in tensors:
            raise OdloraError(f"{source}: missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise OdloraError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise OdloraError(f"{source}: unexpected tensor {unexpected[0]} for model_type={args.model_type}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    model.init_rope()
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval()


def load_base(spec: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Base:
    path = resolve(spec)
    if path.suffix == ".gguf":
        config, tensors = read_gguf(path)
        tokenizer = read_gguf_tokenizer(path)
        fingerprint = fingerprint_tensors(tensors)
    else:
        config = read_config(path)
        _family(config, path)  # fail on the architecture before reading weights
        files = weight_files(path)
        tensors = read_tensors(files)
        tokenizer = load_tokenizer(path)
        fingerprint = cached_fingerprint(registry.odlora_home() / "fingerprints", files, lambda: fingerprint_tensors(tensors))
    model = build_model(config, tensors, path, dtype)
    return Base(spec=spec or registry.DEFAULT_BASE, path=path, config=config, model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a bad or missing tokenizer
        raise OdloraError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def convert_gguf_to_dir(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF once into a Hugging Face directory that loads fast."""
    config, tensors = read_gguf(gguf)
    write_model_dir(out, config, tensors, read_gguf_tokenizer(gguf))


def describe_base(base: Base) -> dict:
    """What `odlora base info` prints."""
    args = base.model.args
    files = [base.path] if base.path.is_file() else weight_files(base.path)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in base.model.parameters()})
    return {
        "base": base.spec,
        "path": str(base.path),
        "architecture": args.model_type,
        "parameters": base.n_params,
        "dtype": ",".join(dtypes),
        "layers": args.n_layers,
        "hidden_size": args.dim,
        "heads": f"{args.n_heads} query / {args.n_kv_heads} key-value",
        "vocab_size": args.vocab_size,
        "max_positions": args.max_seq_len,
        "chat_template": bool(getattr(base.tokenizer, "chat_template", None)),
        "size_bytes": sum(f.stat().st_size for f in files),
        "fingerprint": base.fingerprint,
    }
