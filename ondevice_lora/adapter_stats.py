"""What `odlora adapter inspect` reports: size, rank, targets and the spectrum of each ΔW."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import Adapter


def singular_values(adapter: Adapter, name: str) -> torch.Tensor:
    """Singular values of ΔW = s·B·A without forming the (out x in) matrix: with B = Q_B R_B and
    Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ, so they are those of an r x r matrix."""
    _, r_b = torch.linalg.qr(adapter.B[name].double())
    _, r_a = torch.linalg.qr(adapter.A[name].double().t())
    return torch.linalg.svdvals(adapter.scalings[name] * r_b @ r_a.t()).float()


def effective_rank(sv: torch.Tensor, energy: float = 0.9) -> int:
    """Fewest singular directions holding `energy` of Σσ² (0 for an all-zero update)."""
    power = sv.double() ** 2
    total = power.sum()
    if total == 0:
        return 0
    return int((power.cumsum(0) / total < energy).sum()) + 1


def inspect_adapter(adapter: Adapter, path: Path) -> dict:
    modules = {}
    for name in sorted(adapter.A, key=_natural):
        sv = singular_values(adapter, name)
        modules[name] = {
            "rank": adapter.A[name].shape[0],
            "delta_norm": float(sv.norm()),
            "effective_rank_90": effective_rank(sv),
            "singular_values": [round(float(v), 6) for v in sv],
        }
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    meta = adapter.meta
    return {
        "path": str(path),
        "rank": adapter.rank,
        "alpha": adapter.config.alpha,
        "targets": sorted({n.rsplit(".", 1)[1] for n in adapter.A}),
        "modules": len(adapter.A),
        "parameters": adapter.n_params(),
        "size_bytes": size,
        "base": meta.get("base"),
        "base_fingerprint": meta.get("base_fingerprint"),
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if k != "val_history"},
        "per_module": modules,
    }


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
