"""What a training run asks for against what the base and this machine hold: the base's context
(--seq-len), its linears' sizes (--rank) and the RAM that the activations of one batch take
(--batch-size x --seq-len). Checked once the base is loaded and before any data is read, so a
run that cannot work stops in seconds (not, as `--seq-len 100000` did, at the OOM killer after
83 s), with one line that says what would fit. The ranges that need neither are in bounds.py.
"""

from __future__ import annotations

from typing import Optional

from .errors import OdloraError, named

MIN_ROW = 8  # bounds.SEQ_LEN's floor: the shortest row worth suggesting


def check_seq_len(seq_len: int, config: dict) -> None:
    """Refuse rows longer than the base's positions (its RoPE was trained on no more)."""
    context = config.get("max_position_embeddings")
    if context and seq_len > context:
        raise OdloraError(f"{seq_len} exceeds the base's context of {context} tokens", param="seq_len")


def check_rank(model, names: list[str], rank: int) -> None:
    """Refuse a rank above min(in, out) of a linear it adapts: ΔW = BA of an (out x in) matrix has
    at most that rank, so more only adds parameters (`--rank 100000` wrote a 782 MB adapter)."""
    limit, name = min((min(m.in_features, m.out_features), n) for n in names for m in [model.get_submodule(n)])
    if rank > limit:
        raise OdloraError(f"{rank} exceeds {limit}, the smaller dimension of {name} "
                          f"(a LoRA update of that linear has at most rank {limit})", param="rank")


def activation_bytes_per_token(config: dict, dtype_bytes: int, checkpointing: bool) -> int:
    """Training memory per token of a batch, an upper bound.

    What backward keeps of each decoder layer: the inputs of its norms, projections, attention
    and SwiGLU, about 8 x hidden + 2 x key/value + 3 x intermediate values (attention itself is
    SDPA's flash kernel: no seq x seq scores). With activation checkpointing only each layer's
    input is kept, plus one layer recomputed at a time. Then the fp32 logits, their softmax and
    gradient over the vocabulary, with every position a target (as for .txt data).
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or hidden // heads)
    per_layer = (8 * hidden + 2 * kv + 3 * config["intermediate_size"]) * dtype_bytes
    kept = hidden * dtype_bytes * layers + per_layer if checkpointing else per_layer * layers
    return kept + 3 * 4 * config["vocab_size"]


def available_memory() -> int:
    """Bytes this process could still allocate without swapping (psutil: Linux and macOS alike)."""
    import psutil

    return psutil.virtual_memory().available


def check_training_memory(config: dict, batch_size: int, seq_len: int, dtype_bytes: int, checkpointing: bool,
                          available: Optional[int] = None) -> None:
    """Refuse a batch whose activations would not fit in the available RAM; say what would."""
    available = available_memory() if available is None else available
    per_token = activation_bytes_per_token(config, dtype_bytes, checkpointing)
    need = per_token * batch_size * seq_len
    if need <= available:
        return
    fits = available // per_token
    raise OdloraError(f"{named('batch_size')} x {named('seq_len')}: {batch_size} x {seq_len} tokens would need about "
                      f"{gib(need)} of activations and {gib(available)} is available; {fitting(fits, batch_size, seq_len)}"
                      f"{'' if checkpointing else ', or add ' + named('activation_checkpointing')}")


def fitting(tokens: int, batch_size: int, seq_len: int) -> str:
    """A suggestion within `tokens` per batch: a shorter row at this batch size, else a smaller batch."""
    if tokens < MIN_ROW:
        return "not even one row of 8 tokens fits: free some memory"
    longest = tokens // batch_size // MIN_ROW * MIN_ROW
    if longest >= MIN_ROW:
        return f"about {tokens:,} tokens per batch fit, e.g. {named('seq_len')} {longest} at {named('batch_size')} {batch_size}"
    rows = max(1, tokens // seq_len)
    row = min(seq_len, tokens // MIN_ROW * MIN_ROW)
    return f"about {tokens:,} tokens per batch fit, e.g. {named('batch_size')} {rows} at {named('seq_len')} {row}"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
