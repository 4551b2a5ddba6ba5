"""What the machine computes fast: the compute dtype that training picks by default.

bf16 halves the bytes of every activation and weight, and on CPUs with native bf16 arithmetic
(x86's AVX512-BF16 or AMX) its matmuls are about twice as fast as fp32's. Without it (an
AVX2-only CPU, most laptops before 2023) PyTorch emulates bf16 and the same matmul is far slower:
1024x576 @ 576x1536 took 1459 ms in bf16 against 40 ms in fp32 on a 2-core AMD EPYC with AVX2
only, which made a default-base training step minutes long. So `auto` takes bf16 only where the
CPU has it.
"""

from __future__ import annotations

import platform

import torch



def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls: x86 AVX512-BF16 or AMX tiles; ARM64 CPUs with bf16 (Apple M2 and later,
    Graviton 3, Neoverse V1/N2) are taken at their word by oneDNN/ACL, so ARM64 counts as yes."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_compute_dtype(requested: str) -> str:
    """"bf16" or "fp32" for `requested` (auto: bf16 where the CPU computes it natively)."""
    if requested == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return requested
