"""`odlora personalize`: train a LoRA adapter on local data against a frozen, quantised base.

    load base -> read + split + pack data -> quantise the frozen base -> inject LoRA
    -> train (AdamW on A/B) -> save the adapter atomically (PEFT format + odlora.json)

`engine` picks what computes the gradients: `torch` (the laptop path: autograd on our model,
base quantised) or `executorch` (an exported ExecuTorch training program, base fp32 or int8; see
`device_train.py`). Everything else, data to adapter, is the same code for both.

What is at `out` is safe (`outputs.py`): `out` must not be or hold the data, the base or the
program, and an existing adapter there is replaced only with `force` or `resume`, and only by a
finished run, swapped in whole (`atomic.py`). Ctrl-C checkpoints the last finished step beside
`out` (`.OUT.checkpoint`: continue with `resume`); when `out` held nothing it also saves that step's
adapter there, marked `"interrupted": true`. A loss or factor that is not finite stops the run
with an error and writes nothing to `out`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .adapter import adapter_from_factors, save_adapter
from .atomic import discard
from .base import Base, load_base, load_tokenizer, resolve
from .capacity import check_rank, check_seq_len, check_training_memory
from .config import LoraConfig, PersonalizeConfig, parse_layers
from .data import IGNORE, data_stats, pack, read_examples, split_examples
from .devices import resolve_compute_dtype
from .errors import OdloraError, named
from .lora import apply_lora, match_targets
from .outputs import ADAPTER, check_output
from .prompts import resolve_prompt_format
from .quant import quantize_base
from .train import TorchEngine, config_identity, train, underfit_hint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(cfg: PersonalizeConfig) -> str:
    """"bf16" or "fp32": `cfg.dtype`, with auto resolved for this CPU (the ExecuTorch engine: fp32)."""
    if cfg.dtype == "auto" and cfg.engine == "executorch":
        return "fp32"
    return resolve_compute_dtype(cfg.dtype)


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.checkpoint")


def check_fits(cfg: PersonalizeConfig, lora: LoraConfig, base: Base) -> None:
    """The flags against the loaded base and this machine (capacity.py), before any data is read."""
    check_seq_len(cfg.seq_len, base.config)
    if base.model is not None:  # (a training program fixed its targets and rank when it was exported)
        check_rank(base.model, match_targets(base.model, lora.targets, lora.layers), lora.rank)
    check_training_memory(base.config, cfg.training.batch_size, cfg.seq_len, DTYPES[compute_dtype(cfg)].itemsize,
                          cfg.training.activation_checkpointing)


def prepare_data(cfg: PersonalizeConfig, data: Path, tokenizer):
    prompt_format = resolve_prompt_format(cfg.prompt_format, tokenizer)
    examples = read_examples(data, tokenizer, cfg.seq_len, cfg.train_on_prompt, prompt_format)
    if cfg.val_data is not None:
        train_ex, val_ex = examples, read_examples(cfg.val_data, tokenizer, cfg.seq_len, cfg.train_on_prompt,
                                                   prompt_format)
    else:
        train_ex, val_ex = split_examples(examples, cfg.val_split, cfg.training.seed)
    if not val_ex:
        raise OdloraError(f"no validation examples: use {named('val_split')} > 0 with at least 2 examples, "
                          f"or {named('val_data')}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_packed, val_packed = pack(train_ex, cfg.seq_len, pad), pack(val_ex, cfg.seq_len, pad)
    stats = data_stats(train_ex, train_packed, files=len(examples.files), dropped=examples.dropped).to_dict()
    stats["val_examples"] = len(val_ex)
    stats["kinds"] = dict(examples.kinds)
    stats["prompt_format"] = prompt_format
    stats["first_example"] = show_example(tokenizer, train_ex[0])
    return train_packed, val_packed, stats


def show_example(tokenizer, example) -> dict:
    """An example as the model sees it: the text it reads, and the part it learns to write."""
    first = next(i for i, t in enumerate(example.targets) if t != IGNORE)  # input_ids[: first + 1] predict it
    return {"context": tokenizer.decode(example.input_ids[: first + 1]),
            "learned": tokenizer.decode([t for t in example.targets if t != IGNORE])}


def check_out(cfg: PersonalizeConfig, data: Path, out: Path, replace: bool) -> Path:
    """Refuse an --out that is or holds an input, or is anything but an adapter we may replace."""
    from_program = cfg.engine == "executorch" and cfg.program is not None
    inputs = {"data": [data], "val_data": [cfg.val_data], "program": [cfg.program],
              "base": [] if from_program else [resolve(cfg.base)]}
    return check_output(out, ADAPTER, replace, inputs)


def personalize(cfg: PersonalizeConfig, data: Path, out: Path, resume: bool = False,
                say: Callable[[str], None] = print, progress=None,
                on_record: Optional[Callable[[dict], None]] = None, force: bool = False,
                program_exporter: Optional[Callable] = None) -> dict:
    """Train and save an adapter at `out`; returns the metrics written to its odlora.json.

    An adapter already at `out` is replaced only with `force` or `resume`. progress(record,
    total_steps) sees each step; on_record(record) sees each step and each validation as it
    happens (the records train_log.jsonl keeps), e.g. to draw live loss curves. With engine
    "executorch" and no `cfg.program`, program_exporter(base, lora, batch_size, seq_len,
    base_quant, say) -> Path supplies the training program.
    """
    cfg.validate()  # before the base is loaded: a bad flag costs nothing
    if cfg.engine == "executorch" and cfg.program is None and program_exporter is None:
        raise OdloraError("engine executorch needs a training program: pass program (an `odlora export --trainable` "
                          "directory) or program_exporter (e.g. exporters.export.cached_training_program)")
    out = check_out(cfg, data, Path(out), replace=force or resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.training.seed)
    base = program_base(cfg.program) if cfg.engine == "executorch" and cfg.program else load_base(cfg.base)
    n_layers = base.model.args.n_layers if base.model is not None else base.config["num_hidden_layers"]
    lora = replace(cfg.lora, layers=parse_layers(cfg.layers, n_layers))
    check_fits(cfg, lora, base)
    if cfg.engine == "executorch":
        check_executorch_flags(cfg, lora)
    train_data, val_data, stats = prepare_data(cfg, data, base.tokenizer)
    say(f"data: {stats['examples']} train / {stats['val_examples']} val examples, "
        f"{stats['loss_tokens']} loss tokens, {stats['packed_rows']} packed rows of {cfg.seq_len}")
    if cfg.engine == "executorch":
        engine, setup = executorch_engine(cfg, base, lora, say, program_exporter)
    else:
        engine, setup = torch_engine(cfg, base, lora, say)
    n_train = sum(p.numel() for p in engine.params.values())
    say(f"LoRA r={lora.rank} on {len(engine.factors())} linears ({n_train:,} trainable parameters), "
        f"base {setup['base_quant']} / {setup['dtype']}, engine {cfg.engine}")

    identity = config_identity(base.fingerprint, lora.to_dict(), cfg.training, stats)
    if cfg.engine != "torch":  # (torch checkpoints keep their identity from before engines existed)
        identity["engine"] = cfg.engine
    log_records = []

    def log(record: dict) -> None:
        log_records.append(record)
        if on_record:
            on_record(record)

    meta = {"base": base.spec, "base_fingerprint": base.fingerprint, **setup, "prompt_format": stats["prompt_format"],
            "seq_len": cfg.seq_len, "data": stats, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        history = train(engine, train_data, val_data, cfg.training, identity, checkpoint_dir(out), resume,
                        progress=progress, log=log)
    except KeyboardInterrupt:
        say(interrupted(out, engine, lora, meta, [r for r in log_records if r["event"] == "eval"], base.spec))
        raise
    val = history["val"]
    meta["metrics"] = {
        "val_loss_before": val[0]["loss"], "val_loss": val[-1]["loss"],
        "val_perplexity_before": val[0]["perplexity"], "val_perplexity": val[-1]["perplexity"],
        "train_loss": history["train_loss"], "steps": history["steps"], "train_tokens": history["train_tokens"],
        "tokens_per_s": history["tokens_per_s"], "seconds": history["seconds"], "val_history": val,
    }
    meta["training"] = identity["training"]
    save_adapter(adapter_from_factors(finite_factors(engine), lora, meta), out, base.spec)
    _write_log(out, log_records)
    hint = underfit_hint([r["loss"] for r in log_records if r["event"] == "step"])
    if hint:
        say(hint)
    discard(checkpoint_dir(out))  # the adapter supersedes it
    return meta["metrics"]


def finite_factors(engine) -> dict:
    """The engine's factors, refused if any value is not finite (a NaN adapter must never replace a good one)."""
    factors = engine.factors()
    for name, pair in factors.items():
        for factor, tensor in pair.items():
            if not torch.isfinite(tensor).all():
                raise OdloraError(f"training produced non-finite values in {name} lora_{factor}; lower {named('lr')} "
                                  f"or {named('alpha')} (nothing was written to {named('out')})")
    return factors


def interrupted(out: Path, engine, lora: LoraConfig, meta: dict, evals: list, base_spec: str) -> str:
    """After Ctrl-C (train() has checkpointed the last finished step): save that step's adapter at
    `out` only if nothing is there, and say where the run's work went."""
    ckpt = checkpoint_dir(out)
    where = (f"the run so far is checkpointed in {ckpt}: continue it with --resume" if ckpt.is_dir()
             else "no step had finished: nothing to keep")
    if os.path.lexists(out) or not ckpt.is_dir():
        return f"interrupted: {where}; {out} is unchanged"
    meta = {**meta, "interrupted": True, "metrics": {"val": evals}}
    save_adapter(adapter_from_factors(finite_factors(engine), lora, meta), out, base_spec)
    return f"interrupted: {where}; the adapter of the last finished step is saved in {out}"


def torch_engine(cfg: PersonalizeConfig, base: Base, lora: LoraConfig, say) -> tuple[TorchEngine, dict]:
    """The laptop path: the base quantised and LoRA-wrapped in PyTorch."""
    model = quantize_base(base.model, cfg.base_quant, DTYPES[compute_dtype(cfg)])
    apply_lora(model, lora)
    engine = TorchEngine(model, cfg.training.activation_checkpointing, cfg.training.compile)
    return engine, {"base_quant": cfg.base_quant, "dtype": compute_dtype(cfg)}


def check_executorch_flags(cfg: PersonalizeConfig, lora: LoraConfig) -> None:
    """What --engine executorch cannot do, refused before any data is read or program exported."""
    from .device_train import check_program, read_program

    for flag in ("activation_checkpointing", "compile"):
        if getattr(cfg.training, flag):
            raise OdloraError("is not supported by the executorch engine", param=flag)
    if lora.dropout:
        raise OdloraError("is not supported by the executorch engine (the program has no random ops)", param="dropout")
    if cfg.base_quant not in ("none", "int8") or compute_dtype(cfg) != "fp32":
        raise OdloraError(f"executorch computes in fp32 on a base held as none (fp32) or int8: use "
                          f"{named('base_quant')} none|int8 {named('dtype')} fp32 (the defaults for this engine: none, "
                          f"fp32)", param="engine")
    if cfg.program is not None:
        check_program(read_program(Path(cfg.program)), lora, cfg.training.batch_size, cfg.seq_len, cfg.base_quant,
                      Path(cfg.program))


def executorch_engine(cfg: PersonalizeConfig, base: Base, lora: LoraConfig, say, program_exporter):
    """An ExecuTorch training program (`cfg.program`, or `program_exporter`'s for this base and shape)
    and its engine."""
    from .device_train import ExecutorchEngine, read_program

    if cfg.program is not None:
        program = Path(cfg.program)
    else:
        program = program_exporter(base, lora, cfg.training.batch_size, cfg.seq_len, cfg.base_quant, say)
    manifest = read_program(program)
    if manifest["base_fingerprint"] != base.fingerprint:
        raise OdloraError(f"{program} was exported for another base", param="program")
    engine = ExecutorchEngine(program, manifest, seed=cfg.training.seed, threads=cfg.threads)
    return engine, {"base_quant": cfg.base_quant, "dtype": "fp32", "engine": "executorch", "program": str(program)}


def program_base(program: Path) -> Base:
    """What personalize needs of the base, read from a training program alone (no base weights)."""
    from .device_train import read_program

    manifest = read_program(Path(program))
    return Base(spec=manifest["base"], path=Path(program), config=manifest["config"], model=None,
                tokenizer=load_tokenizer(Path(program) / "tokenizer"), fingerprint=manifest["base_fingerprint"])


def dry_run(cfg: PersonalizeConfig, data: Path) -> dict:
    """What a run would do, without training: the data as read and packed, the steps, the modules
    LoRA would adapt and its trainable parameters."""
    cfg.validate()
    base = load_base(cfg.base)
    lora = replace(cfg.lora, layers=parse_layers(cfg.layers, base.model.args.n_layers))
    check_fits(cfg, lora, base)
    modules = match_targets(base.model, lora.targets, lora.layers)
    train_rows, _, stats = prepare_data(cfg, data, base.tokenizer)
    linears = dict(base.model.named_modules())
    params = sum(cfg.lora.rank * (linears[m].in_features + linears[m].out_features) for m in modules)
    steps = cfg.training.total_steps(len(train_rows))
    rows_per_step = cfg.training.batch_size * cfg.training.grad_accum
    return {"modules": modules, "trainable_parameters": params, "data": stats, "steps": steps,
            "epochs": round(steps * rows_per_step / len(train_rows), 2), "rows_per_step": rows_per_step}


def format_dry_run(info: dict) -> str:
    """`--dry-run`'s summary for a person (the same facts as its --json)."""
    d = info["data"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in d["kinds"].items())
    example = d["first_example"]
    lines = [
        f"data: {d['examples']} train / {d['val_examples']} val examples from {d['files']} file(s) ({kinds}), "
        f"{d['dropped']} dropped",
        f"      {d['tokens']} tokens, {d['loss_tokens']} of them trained on; prompt format: {d['prompt_format']}",
        f"packing: {d['packed_rows']} rows, {d['padding_fraction']:.1%} padding",
        f"steps: {info['steps']} of {info['rows_per_step']} rows (about {info['epochs']} epochs)",
        f"LoRA: {len(info['modules'])} modules, {info['trainable_parameters']:,} trainable parameters",
        "first example, as the model reads it:", f"  {example['context']!r}",
        "and the part it learns to write:", f"  {example['learned']!r}",
        "modules:", *(f"  {m}" for m in info["modules"]),
    ]
    return "\n".join(lines)


def _write_log(out: Path, records: list[dict]) -> None:
    """Every step and evaluation as one JSON line, beside the adapter files."""
    with open(out / "train_log.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
