"""Adapters on disk and in memory: PEFT's format plus our `odlora.json`, blending and merging.

An adapter directory holds

    adapter_config.json         PEFT's LoraConfig (PEFT loads our adapters as its own)
    adapter_model.safetensors   `base_model.model.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r)
    odlora.json                 base fingerprint, rank, targets, data statistics, metrics, tool version

Adapters trained by PEFT (no odlora.json) load too; they carry no base fingerprint, so joins
check every tensor's name and shape against the base instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import OdloraError
from .formats.schemas import AdapterMeta, Model, PeftAdapterConfig, read_json, to_dict
from .config import LoraConfig, lora_scaling
from .lora import LoRALinear, lora_layers
from .models.rewrite import replace_linears
from .outputs import ADAPTER, staged_output
from .prompts import DEFAULT_PROMPT_FORMAT
from .registry import hub_name

PEFT_PREFIX = "base_model.model."
# the module is a dotted path of names and indices (model.layers.0.self_attn.q_proj)
KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(\w+(?:\.\w+)*)\.lora_([AB])\.weight")


@dataclass
class Adapter:
    """LoRA factors per module: ΔW[name] = scalings[name] · B @ A, all in fp32."""

    A: dict[str, torch.Tensor]  # name -> (r, in)
    B: dict[str, torch.Tensor]  # name -> (out, r)
    scalings: dict[str, float]
    config: LoraConfig
    meta: dict = field(default_factory=dict)  # the odlora.json content

    @property
    def fingerprint(self) -> Optional[str]:
        return self.meta.get("base_fingerprint")

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a in self.A.values())

    @property
    def prompt_format(self) -> str:
        """How it was trained to be asked (prompts.py); "chat" for PEFT's adapters and older ones."""
        return self.meta.get("prompt_format", DEFAULT_PROMPT_FORMAT)

    def delta(self, name: str) -> torch.Tensor:
        return self.scalings[name] * (self.B[name].float() @ self.A[name].float())

    def n_params(self) -> int:
        return sum(a.numel() + self.B[n].numel() for n, a in self.A.items())


# -- from and onto a model ------------------------------------------------------------------

def model_factors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"A": (r, in), "B": (out, r)} of a model's LoRA layers, fp32 copies."""
    return {n: {"A": m.lora_A.weight.detach().float().clone(), "B": m.lora_B.weight.detach().float().clone()}
            for n, m in lora_layers(model).items()}


def adapter_from_model(model: nn.Module, config: LoraConfig, meta: dict) -> Adapter:
    return adapter_from_factors(model_factors(model), config, meta)


def adapter_from_factors(factors: dict[str, dict[str, torch.Tensor]], config: LoraConfig, meta: dict) -> Adapter:
    """An adapter from module name -> {"A", "B"} (what a training engine's `factors()` returns)."""
    return Adapter(A={n: f["A"] for n, f in factors.items()}, B={n: f["B"] for n, f in factors.items()},
                   scalings={n: config.scaling for n in factors}, config=config, meta=meta)


def attach_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Wrap each adapted linear of `model` in a LoRALinear holding the adapter's factors."""
    for name in adapter.A:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise OdloraError(f"adapter module {name} does not exist in this base") from None
    replace_linears(model, adapter.A, lambda name, linear: adapted_linear(linear, adapter, name))


def adapted_linear(base_layer: nn.Module, adapter: Adapter, name: str) -> LoRALinear:
    """`base_layer` wrapped in a frozen LoRALinear holding the adapter's factors for module `name`."""
    a, b = adapter.A[name], adapter.B[name]
    if isinstance(base_layer, LoRALinear):
        raise OdloraError(f"{name} already carries an adapter; blend adapters instead of stacking them")
    if (a.shape[1], b.shape[0]) != (base_layer.in_features, base_layer.out_features):
        raise OdloraError(f"adapter module {name} is {b.shape[0]}x{a.shape[1]}, the base layer is "
                          f"{base_layer.out_features}x{base_layer.in_features}: the adapter was made for another base")
    lora = LoRALinear(base_layer, a.shape[0], adapter.scalings[name])
    lora.lora_A.weight.data.copy_(a)
    lora.lora_B.weight.data.copy_(b)
    return lora.requires_grad_(False)


def check_base(adapter: Adapter, fingerprint: str, where: str) -> None:
    if adapter.fingerprint and adapter.fingerprint != fingerprint:
        raise OdloraError(
            f"{where}: adapter was trained on base {adapter.fingerprint[:19]}..., "
            f"this base is {fingerprint[:19]}... (a different base)"
        )


# -- blending and merging ---------------------------------------------------------------------

def blend(weighted: list[tuple[Adapter, float]]) -> Adapter:
    """One adapter equal to Σ wᵢ ΔWᵢ: factors stack along the rank axis, scales fold into B.
    A single adapter with weight w is its strength dial (w=0 is the base, w=1 itself)."""
    if not weighted:
        raise OdloraError("no adapter to blend")
    names = sorted({n for adapter, _ in weighted for n in adapter.A})
    A, B = {}, {}
    for name in names:
        parts = [(ad, w) for ad, w in weighted if name in ad.A]
        A[name] = torch.cat([ad.A[name] for ad, _ in parts], dim=0)
        B[name] = torch.cat([ad.B[name] * (w * ad.scalings[name]) for ad, w in parts], dim=1)
    first = weighted[0][0]
    fingerprints = {ad.fingerprint for ad, _ in weighted if ad.fingerprint}
    if len(fingerprints) > 1:
        raise OdloraError("cannot blend adapters trained on different bases")
    formats = {ad.prompt_format for ad, _ in weighted}
    if len(formats) > 1:
        raise OdloraError(f"cannot blend adapters trained with different prompt formats ({', '.join(sorted(formats))})")
    rank = max(a.shape[0] for a in A.values())
    config = LoraConfig(rank=rank, alpha=float(rank), targets=tuple(sorted({n.rsplit(".", 1)[1] for n in names})))
    meta = {"base_fingerprint": next(iter(fingerprints), None), "blend": [w for _, w in weighted],
            "prompt_format": formats.pop()}
    return Adapter(A=A, B=B, scalings={n: 1.0 for n in names}, config=config if len(weighted) > 1 else first.config, meta=meta)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter, sign: float = 1.0) -> None:
    """W ← W + sign · ΔW for plain fp32/bf16 linears, computed in fp32 (sign=-1 unmerges)."""
    for name in adapter.A:
        layer = model.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise OdloraError(f"cannot merge into {name}: it is {type(layer).__name__}, not a plain linear")
        merged = layer.weight.float() + sign * adapter.delta(name)
        layer.weight.copy_(merged.to(layer.weight.dtype))


# -- disk -----------------------------------------------------------------------------------

def peft_config(adapter: Adapter, base_name: str) -> dict:
    c = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": hub_name(base_name),
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.use_rslora,
        "target_modules": sorted(c.targets),
        "layers_to_transform": list(c.layers) if c.layers is not None else None,
        "layers_pattern": "layers" if c.layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def save_adapter(adapter: Adapter, out: Path, base_name: str) -> None:
    """Write atomically: a complete directory appears at `out`, or nothing changes there.
    Replaces only a previous adapter directory (commands decide whether they may: `outputs.py`)."""
    tensors = {}
    for name in adapter.A:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapter.A[name].contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.B[name].contiguous()
    meta = {"format": "odlora-adapter", "version": 1, "tool_version": __version__, **adapter.meta,
            "rank": adapter.config.rank, "alpha": adapter.config.alpha, "use_rslora": adapter.config.use_rslora,
            "targets": list(adapter.config.targets), "modules": len(adapter.A), "parameters": adapter.n_params()}
    with staged_output(out, ADAPTER) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(adapter, base_name), indent=2) + "\n")
        (tmp / "odlora.json").write_text(json.dumps(meta, indent=2) + "\n")


def _read(path: Path, schema: type[Model]) -> Model:
    try:
        return read_json(path, schema)
    except FileNotFoundError:
        raise OdloraError(f"{path.parent}: not an adapter directory (no {path.name})") from None


def load_adapter(path: Path) -> Adapter:
    """Read an adapter directory written by odlora or by PEFT."""
    path = Path(path)
    if not path.is_dir():
        raise OdloraError(f"{path}: no such adapter directory")
    config_file = path / "adapter_config.json"
    cfg = _read(config_file, PeftAdapterConfig)
    meta = to_dict(_read(path / "odlora.json", AdapterMeta)) if (path / "odlora.json").exists() else {}
    if cfg.peft_type != "LORA":
        raise OdloraError(f"{config_file}: peft_type {cfg.peft_type!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if getattr(cfg, flag):
            raise OdloraError(f"{config_file}: {flag}=true is not supported")
    if cfg.bias != "none" or cfg.modules_to_save:
        raise OdloraError(f"{config_file}: adapters that train biases or whole modules are not supported")
    weights = path / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise OdloraError(f"{path}: no adapter_model.safetensors (pickled .bin adapters are not loaded)") from None
    except (SafetensorError, OSError) as e:
        raise OdloraError(f"{weights}: corrupt safetensors file ({e})") from None
    A, B = _split_factors(tensors, weights)
    for name in sorted(A):
        _check_factors(name, A[name], B[name], _pattern(cfg.rank_pattern, name, cfg.r), weights)
    scalings = {n: lora_scaling(_pattern(cfg.alpha_pattern, n, cfg.lora_alpha), A[n].shape[0], cfg.use_rslora)
                for n in A}
    config = LoraConfig(rank=cfg.r or max(a.shape[0] for a in A.values()), alpha=cfg.lora_alpha,
                        targets=tuple(sorted({n.rsplit(".", 1)[1] for n in A})), use_rslora=cfg.use_rslora)
    return Adapter(A=A, B=B, scalings=scalings, config=config, meta=meta)


def _key(name: str, factor: str) -> str:
    return f"{PEFT_PREFIX}{name}.lora_{factor}.weight"


def _split_factors(tensors: dict, source: Path) -> tuple[dict, dict]:
    A, B = {}, {}
    for key, t in tensors.items():
        m = KEY.fullmatch(key.replace(".default.", "."))
        if not m:
            raise OdloraError(f"{source}: unexpected tensor {key} (expected PEFT LoRA keys "
                              f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        if not t.is_floating_point():
            raise OdloraError(f"{source}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, not floating point")
        (A if m[2] == "A" else B)[m[1]] = t.float()
    if not A:
        raise OdloraError(f"{source}: holds no LoRA tensors")
    for name in A.keys() | B.keys():
        if name not in A or name not in B:
            raise OdloraError(f"{source}: module {name} lacks its lora_{'A' if name not in A else 'B'} tensor")
    return A, B


def _check_factors(name: str, a: torch.Tensor, b: torch.Tensor, rank: Optional[int], source: Path) -> None:
    """A (r, in) and B (out, r) with r >= 1 (the config's rank when it gives one), finite values."""
    for factor, t in (("A", a), ("B", b)):
        if t.ndim != 2:
            raise OdloraError(f"{source}: tensor {_key(name, factor)} has shape {tuple(t.shape)}: "
                              f"a LoRA factor is a matrix")
        if t.numel() == 0:
            raise OdloraError(f"{source}: tensor {_key(name, factor)} has shape {tuple(t.shape)}: "
                              f"{'rank 0' if t.shape[factor == 'B'] == 0 else 'no features'}")
        if not torch.isfinite(t).all():
            raise OdloraError(f"{source}: tensor {_key(name, factor)} holds NaN or infinite values")
    if a.shape[0] != b.shape[1]:
        raise OdloraError(f"{source}: tensors {_key(name, 'A')} {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                          f"disagree on the rank (A's rows, B's columns)")
    if rank is not None and a.shape[0] != rank:
        raise OdloraError(f"{source}: tensor {_key(name, 'A')} has rank {a.shape[0]}, "
                          f"adapter_config.json says {rank}")


def _pattern(patterns: dict, name: str, default):
    """PEFT's per-module override (rank_pattern, alpha_pattern): a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default
