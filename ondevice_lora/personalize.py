"""`odlora personalize`: train a LoRA adapter on local data against a frozen, quantised base.

    load base -> read + split + pack data -> quantise the frozen base -> inject LoRA
    -> train (AdamW on A/B) -> save the adapter atomically (PEFT format + odlora.json)

The adapter is written to a temporary directory and renamed into place, so an existing
adapter at `out` survives any failed or interrupted run. Ctrl-C saves the adapter of the last
finished step (marked `"interrupted": true`) and exits.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .adapter import adapter_from_model, save_adapter
from .base import load_base
from .data import data_stats, pack, read_examples, split_examples
from .errors import OdloraError
from .lora import LoraConfig, apply_lora, match_targets, parse_layers
from .quant import quantize_base
from .train import TrainConfig, config_identity, train

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class PersonalizeConfig:
    base: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 128
    val_split: float = 0.1
    val_data: Optional[Path] = None
    base_quant: str = "int8"  # fastest of none/int8/int4 at equal quality on a 2-core CPU (bench/)
    dtype: str = "bf16"
    layers: str = "all"  # parsed once the base's layer count is known
    train_on_prompt: bool = False
    threads: Optional[int] = None


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.checkpoint")


def prepare_data(cfg: PersonalizeConfig, data: Path, tokenizer):
    if cfg.seq_len < 8:
        raise OdloraError(f"--seq-len must be >= 8, got {cfg.seq_len}")
    examples = read_examples(Path(data), tokenizer, cfg.seq_len, cfg.train_on_prompt)
    if cfg.val_data is not None:
        train_ex, val_ex = examples, read_examples(Path(cfg.val_data), tokenizer, cfg.seq_len, cfg.train_on_prompt)
    else:
        train_ex, val_ex = split_examples(examples, cfg.val_split, cfg.training.seed)
    if not val_ex:
        raise OdloraError("no validation examples: use --val-split > 0 with at least 2 examples, or --val-data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_packed, val_packed = pack(train_ex, cfg.seq_len, pad), pack(val_ex, cfg.seq_len, pad)
    stats = data_stats(train_ex, train_packed, files=len(examples.files), dropped=examples.dropped).to_dict()
    stats["val_examples"] = len(val_ex)
    return train_packed, val_packed, stats


def personalize(cfg: PersonalizeConfig, data: Path, out: Path, resume: bool = False,
                say: Callable[[str], None] = print, progress=None,
                on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Train and save an adapter at `out`; returns the metrics written to its odlora.json.

    progress(record, total_steps) sees each step; on_record(record) sees each step and each
    validation as it happens (the records train_log.jsonl keeps), e.g. to draw live loss curves.
    """
    out = Path(out)
    if cfg.dtype not in DTYPES:
        raise OdloraError(f"--dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.training.seed)
    base = load_base(cfg.base)
    lora = replace(cfg.lora, layers=parse_layers(cfg.layers, base.model.args.n_layers))
    match_targets(base.model, lora.targets, lora.layers)  # fail on bad targets before reading data
    train_data, val_data, stats = prepare_data(cfg, data, base.tokenizer)
    say(f"data: {stats['examples']} train / {stats['val_examples']} val examples, "
        f"{stats['loss_tokens']} loss tokens, {stats['packed_rows']} packed rows of {cfg.seq_len}")
    model = quantize_base(base.model, cfg.base_quant, DTYPES[cfg.dtype])
    names = apply_lora(model, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"LoRA r={lora.rank} on {len(names)} linears ({n_train:,} trainable parameters), "
        f"base {cfg.base_quant} / {cfg.dtype}")

    identity = config_identity(base.fingerprint, lora.to_dict(), cfg.training, stats)
    log_records = []

    def log(record: dict) -> None:
        log_records.append(record)
        if on_record:
            on_record(record)

    meta = {"base": base.spec, "base_fingerprint": base.fingerprint, "base_quant": cfg.base_quant,
            "dtype": cfg.dtype, "seq_len": cfg.seq_len, "data": stats, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        history = train(model, train_data, val_data, cfg.training, identity, checkpoint_dir(out), resume,
                        progress=progress, log=log)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        meta["metrics"] = {"val": [r for r in log_records if r["event"] == "eval"]}
        save_adapter(adapter_from_model(model, lora, meta), out, base.spec)
        say(f"interrupted: saved the adapter of the last finished step to {out}")
        raise
    val = history["val"]
    meta["metrics"] = {
        "val_loss_before": val[0]["loss"], "val_loss": val[-1]["loss"],
        "val_perplexity_before": val[0]["perplexity"], "val_perplexity": val[-1]["perplexity"],
        "train_loss": history["train_loss"], "steps": history["steps"], "train_tokens": history["train_tokens"],
        "tokens_per_s": history["tokens_per_s"], "seconds": history["seconds"], "val_history": val,
    }
    meta["training"] = identity["training"]
    save_adapter(adapter_from_model(model, lora, meta), out, base.spec)
    _write_log(out, log_records)
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # the adapter supersedes it
    return meta["metrics"]


def dry_run(cfg: PersonalizeConfig, data: Path) -> dict:
    """The modules LoRA would adapt and the data statistics, without training."""
    base = load_base(cfg.base)
    layers = parse_layers(cfg.layers, base.model.args.n_layers)
    modules = match_targets(base.model, cfg.lora.targets, layers)
    _, _, stats = prepare_data(cfg, data, base.tokenizer)
    return {"modules": modules, "data": stats}


def _write_log(out: Path, records: list[dict]) -> None:
    """Every step and evaluation as one JSON line, beside the adapter files."""
    with open(out / "train_log.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
