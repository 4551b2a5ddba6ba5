"""The LoRA training loop: AdamW on A/B only, warmup + cosine, clipping, accumulation,
periodic validation and atomic checkpoints that `--resume` continues bit for bit.

The loop drives an *engine*, which computes losses and gradients; the loop owns the rest
(batch order, optimiser, schedule, evaluation cadence, checkpoints, logging):

    engine.params                        name -> trainable tensor, updated in place by AdamW
    engine.loss_and_grads(batch, scale)  loss of one micro-batch; adds scale * d loss / d param to .grad
    engine.evaluate(packed)              {"loss", "perplexity", "tokens"} on held-out rows

`TorchEngine` is the laptop path (autograd on our PyTorch model); `device_train.ExecutorchEngine`
runs an exported ExecuTorch training program.

Checkpoints hold only tensors (safetensors) and JSON; nothing is pickled. A checkpoint is one
directory swapped in whole (`atomic.py`), and its state.json records the sha256 of its tensors, so
`--resume` refuses a torn or damaged one. Ctrl-C checkpoints the last finished step; a loss or
gradient that is not finite stops the run with an error before it reaches the factors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from .adapter import model_factors
from .atomic import kill_point
from .config import TrainConfig
from .data import batches
from .errors import OdloraError, named
from .evaluate import evaluate_loss, token_loss
from .models.training_ops import use_training_ops
from .outputs import CHECKPOINT, staged_output
from .formats.manifest import sha256_file
from .formats.schemas import CheckpointState, read_json, to_dict


def lr_lambda(total: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, round(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of storing its activations."""
    for layer in model.model.layers:
        forward = layer.forward
        layer.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def find_cxx_compiler() -> Optional[str]:
    """The C++ compiler TorchInductor would use ($CXX, g++, clang++ or c++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def enable_compile(model) -> None:
    """Compile each decoder layer with TorchInductor for the training steps.

    Inductor fuses the elementwise work around the matmuls (norms, RoPE, SwiGLU, residual adds)
    that eager mode runs as separate passes. Only calls that record gradients take the compiled
    layers: evaluation and generation keep the eager ones, so their other shapes never trigger a
    recompile. The first training step pays for the compile.
    """
    if find_cxx_compiler() is None:
        raise OdloraError("needs a C++ compiler for TorchInductor: g++ or clang++ on PATH, or $CXX", param="compile")
    for layer in model.model.layers:
        eager, compiled = layer.forward, torch.compile(layer.forward)
        layer.forward = lambda *args, _e=eager, _c=compiled: _c(*args) if torch.is_grad_enabled() else _e(*args)


def micro_batches(packed, cfg: TrainConfig):
    """Endless (epoch, batch) stream; batch order depends only on (seed, epoch)."""
    epoch = 0
    while True:
        for batch in batches(packed, cfg.batch_size, cfg.seed, epoch):
            yield epoch, batch
        epoch += 1


class TorchEngine:
    """Autograd on a PyTorch model whose LoRA factors are its only parameters that require grad."""

    def __init__(self, model, activation_checkpointing: bool = False, compile: bool = False):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        if compile:
            enable_compile(model)  # Inductor fuses the plain ops; the lean autograd functions are for eager mode
        else:
            use_training_ops(model)

    def loss_and_grads(self, batch: dict, scale: float) -> float:
        self.model.train()
        loss, _ = token_loss(self.model, batch["input_ids"], batch["targets"], batch["segment_ids"])
        (loss * scale).backward()
        return loss.item()

    def evaluate(self, packed) -> dict:
        return evaluate_loss(self.model, packed)

    def factors(self) -> dict[str, dict[str, torch.Tensor]]:
        return model_factors(self.model)


# -- checkpoints --------------------------------------------------------------------------

def save_checkpoint(path: Path, params: dict, optimizer, state: dict, rng: torch.Tensor) -> None:
    """state.safetensors (factors, AdamW's moments, the RNG state `rng`) and state.json (`state`
    and the sha256 of state.safetensors), swapped in at `path` as one directory."""
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"optim.{n}.{key}"] = value.detach().reshape(-1) if value.ndim == 0 else value.detach().contiguous()
    tensors["rng"] = rng
    with staged_output(path, CHECKPOINT) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        kill_point("checkpoint-tensors")
        (tmp / "state.json").write_text(json.dumps({**state, "sha256": sha256_file(tmp / "state.safetensors")}))


def load_checkpoint(path: Path, params: dict, optimizer, expect: dict) -> dict:
    try:
        state = to_dict(read_json(path / "state.json", CheckpointState))
        intact = state["sha256"] == sha256_file(path / "state.safetensors")
    except OdloraError as e:
        raise OdloraError(str(e), param="resume") from None
    except OSError as e:
        raise OdloraError(f"no usable checkpoint at {path} ({e})", param="resume") from None
    if not intact:
        raise OdloraError(f"checkpoint {path} is torn or damaged (state.safetensors does not match the "
                          f"sha256 in state.json); start afresh, without resume", param="resume")
    tensors = load_file(str(path / "state.safetensors"))
    for key, value in expect.items():
        if state["identity"].get(key) != value:
            raise OdloraError(f"checkpoint {path} was made with a different {key}; start afresh, without resume",
                              param="resume")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
            slots = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
            if slots:
                optimizer.state[p] = {k: (v.reshape(()) if k == "step" else v) for k, v in slots.items()}
    torch.set_rng_state(tensors["rng"])
    return state


# -- the loop -----------------------------------------------------------------------------

@contextmanager
def sigint_deferred():
    """Hold Ctrl-C until the block ends, so that an optimiser step updates every factor or none.
    (Signals reach only the main thread; elsewhere, e.g. a web job, there is nothing to hold.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *args: held.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # delivered now, to the handler that was there


def check_finite(step: int, what: str, value: float) -> None:
    if not math.isfinite(value):
        raise OdloraError(f"training diverged at step {step}: the {what} is {value}; lower {named('lr')} or "
                          f"{named('alpha')} (nothing was written to {named('out')})")


def train(engine, train_data, val_data, cfg: TrainConfig, identity: dict, checkpoint_dir: Path,
          resume: bool = False, progress=None, log: Callable[[dict], None] = lambda record: None) -> dict:
    """Train the engine's trainable (LoRA) parameters. Returns the metrics. After Ctrl-C it
    checkpoints the last finished step to `checkpoint_dir` (for --resume) and raises KeyboardInterrupt
    with the engine holding that step's weights; a non-finite loss raises OdloraError."""
    cfg.validate()
    params = engine.params
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.total_steps(train_data.input_ids.shape[0])

    step, history = 0, {"val": []}
    if resume:
        state = load_checkpoint(checkpoint_dir, params, optimizer, identity)
        step, history = state["step"], state["history"]
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # last_epoch = step - 1 puts the schedule exactly where the checkpointed run left it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg.warmup), last_epoch=step - 1)
    if not resume:
        history["val"].append({"step": 0, **engine.evaluate(val_data)})
        log({"event": "eval", **history["val"][-1]})

    stream = micro_batches(train_data, cfg)
    for _ in range(step * cfg.grad_accum):  # replay the batch order up to the resumed step
        next(stream)
    started, tokens_seen, best, stale = time.perf_counter(), 0, min(v["loss"] for v in history["val"]), 0
    loss_sum, rate = float("nan"), 0.0
    rng = torch.get_rng_state()  # at the last step boundary: what a checkpoint of `step` restores
    try:
        while step < total:
            loss_sum, n_tokens = 0.0, 0
            for _ in range(cfg.grad_accum):
                epoch, batch = next(stream)
                loss = engine.loss_and_grads(batch, 1.0 / cfg.grad_accum)
                loss_sum, n_tokens = loss_sum + loss / cfg.grad_accum, n_tokens + batch["input_ids"].numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            check_finite(step + 1, "training loss", loss_sum)
            check_finite(step + 1, "gradient norm", float(grad_norm))
            with sigint_deferred():
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, tokens_seen = step + 1, tokens_seen + n_tokens
                rng = torch.get_rng_state()  # evaluation draws no random numbers: this is also the state after it
            rate = tokens_seen / (time.perf_counter() - started)
            record = {"event": "step", "step": step, "epoch": epoch, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": rate}
            log(record)
            if progress:
                progress(record, total)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                history["val"].append({"step": step, **engine.evaluate(val_data)})
                check_finite(step, "validation loss", history["val"][-1]["loss"])
                log({"event": "eval", **history["val"][-1]})
                best, stale = (history["val"][-1]["loss"], 0) if history["val"][-1]["loss"] < best else (best, stale + 1)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(checkpoint_dir, params, optimizer, {"step": step, "history": history, "identity": identity},
                                rng)
            kill_point("step")
            if cfg.early_stopping and stale >= cfg.early_stopping:
                log({"event": "early_stop", "step": step})
                break
    except KeyboardInterrupt:
        if step > 0:
            save_checkpoint(checkpoint_dir, params, optimizer, {"step": step, "history": history, "identity": identity},
                            rng)
        raise
    history.update(steps=step, total_steps=total, train_loss=loss_sum, tokens_per_s=rate,
                   seconds=time.perf_counter() - started, train_tokens=tokens_seen)
    return history


def config_identity(base_fingerprint: str, lora: dict, train_cfg: TrainConfig, data_stats: dict) -> dict:
    """What must not change between a checkpoint and `--resume`."""
    train_dict = {k: v for k, v in asdict(train_cfg).items() if k not in ("eval_every", "save_every", "early_stopping", "compile")}
    return {"base": base_fingerprint, "lora": json.loads(json.dumps(lora)), "training": train_dict, "data": data_stats}


def underfit_hint(step_losses: list[float]) -> Optional[str]:
    """A one-line hint when the run ended while the training loss was still falling fast: the mean
    loss of the last quarter of the steps more than 15% below the quarter before it, and still above
    0.1 (below it the answers are already learnt: 0.057 -> 0.024 is no sign of underfitting)."""
    quarter = len(step_losses) // 4
    if quarter < 2:
        return None
    before = sum(step_losses[-2 * quarter : -quarter]) / quarter
    last = sum(step_losses[-quarter:]) / quarter
    if not before > 0 or last > 0.85 * before or last < 0.1:
        return None
    return (f"the training loss was still falling at the end ({before:.3f} -> {last:.3f} over the last quarter of "
            f"the steps): the adapter may be underfit; try more --steps (this run took {len(step_losses)})")
