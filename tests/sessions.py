"""Greedy decoding and perplexity straight on the export sessions (`runtime/onnx.py`'s OnnxSession,
`runtime/executorch.py`'s ExecutorchSession), below the Runtime: what the export tests check
parity and answers with."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ondevice_lora.errors import OdloraError


def as_packed(adapter):
    """The adapter's factors as a packed blob holds them (ONNX and ExecuTorch): fp16, the scale
    folded into B. A parity test against PyTorch with these factors tests the graph, not fp16."""
    for name, scale in adapter.scalings.items():
        adapter.A[name] = adapter.A[name].half().float()
        adapter.B[name] = (adapter.B[name] * scale).half().float() / scale
    return adapter


def onnx_greedy(session, prompt_ids: Sequence[int], n: int, adapter=None, eos_id: Optional[int] = None) -> list[int]:
    """Prefill the prompt in one call, then decode up to n tokens one at a time."""
    prompt_ids = list(prompt_ids)
    if len(prompt_ids) + n > session.max_seq_len:
        raise OdloraError(f"prompt ({len(prompt_ids)}) + {n} new tokens exceed the export's "
                          f"--max-seq-len {session.max_seq_len}")
    caches, out = session.new_cache(), []
    logits, caches = session.forward([prompt_ids], np.arange(len(prompt_ids)), caches, adapter)
    pos = len(prompt_ids)
    while len(out) < n:
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_id or len(out) == n:
            break
        logits, caches = session.forward([[token]], [pos], caches, adapter)
        pos += 1
    return out


def executorch_perplexity(session, ids: list[int], adapter: Optional[dict] = None) -> float:
    """Token perplexity of `ids`, scored in windows of the export's length (each a new sequence)."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, session.max_seq_len):
        window = torch.tensor(ids[start:start + session.max_seq_len + 1])
        if len(window) < 2:
            break
        logits = session.forward(window[:-1], 0, adapter)[0]
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


def executorch_greedy(session, prompt_ids: list[int], n: int, adapter: Optional[dict] = None,
                      stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Up to n greedy tokens after the prompt, a new sequence from position 0 (stop token excluded)."""
    logits = session.forward(prompt_ids, 0, adapter)
    out = []
    for pos in range(len(prompt_ids), len(prompt_ids) + n):
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == n or pos == session.max_seq_len:
            break
        logits = session.forward([token], pos, adapter)
    return out
