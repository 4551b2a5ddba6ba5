"""The on-device trainer: LoRA personalisation inside the ExecuTorch runtime.

    odlora personalize --engine executorch --data dates.jsonl --out adapters/dates
    odlora personalize --engine executorch --program prog/ --data dates.jsonl --out adapters/dates

An exported training program (`exporters/executorch_train.py`: the frozen base plus LoRA A/B,
one joint forward/backward method) computes the loss and the factors' gradients for one
fixed-shape batch; `ExecutorchEngine` drives it and the shared loop in `train.py` does the rest
exactly as on the laptop path: same batches (`data.batches`), AdamW, warmup + cosine schedule,
clipping, accumulation, evaluation, checkpoints and `--resume`.

Why AdamW runs here, on the gradients the program returns, and not in the program: ExecuTorch's
training support offers only SGD (`get_sgd_optimizer` in Python, `optimizer/sgd.h` in C++),
and the laptop path's quality comes from AdamW. The factors the program returns alias its own
memory (`TrainingModule` does not clone them), so the optimiser updates them in place and the
next call sees the new values; nothing is copied per step but the small gradients.

Without `--program`, the CLI has the program for (base, LoRA config, batch, seq_len) exported once
into `$ODLORA_HOME/train-programs/` and reused (`exporters.export.cached_training_program`, handed to
`personalize` as its `program_exporter`: training code does not import the exporters).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .data import IGNORE, PackedData
from .errors import OdloraError, named
from .formats.manifest import read_manifest
from .formats.targets import TRAINING_TARGET
from .config import LoraConfig
from .lora import factor_of


# -- the program on disk ------------------------------------------------------------------------

def read_program(program_dir: Path) -> dict:
    """The manifest of an `odlora export --target executorch --trainable` directory."""
    manifest = read_manifest(program_dir, verify=False)
    if manifest["target"] != TRAINING_TARGET:
        raise OdloraError(f"{program_dir}: a {manifest['target']} export, not an ExecuTorch training program "
                          f"(make one with `odlora export --target executorch --trainable`)")
    for name in manifest["files"]:
        if not (Path(program_dir) / name).is_file():
            raise OdloraError(f"{program_dir}: file {name} listed in the manifest is missing")
    return manifest


def program_lora(manifest: dict) -> LoraConfig:
    return LoraConfig(**manifest["executorch_train"]["lora"])


def check_program(manifest: dict, lora: LoraConfig, batch_size: int, seq_len: int, base_quant: str,
                  where: Path) -> None:
    """Refuse settings that the program was not exported with (they are baked into its graph)."""
    fields = manifest["executorch_train"]
    have = program_lora(manifest)
    wanted = {"rank": (lora.rank, have.rank), "alpha": (lora.alpha, have.alpha),
              "targets": (",".join(lora.targets), ",".join(have.targets)),
              "layers": (lora.layers, have.layers), "use_rslora": (lora.use_rslora, have.use_rslora),
              "batch_size": (batch_size, fields["batch_size"]), "seq_len": (seq_len, fields["seq_len"]),
              "base_quant": (base_quant, fields.get("base_quant", "none"))}
    for setting, (asked, exported) in wanted.items():
        if asked != exported:
            raise OdloraError(f"{where} was exported with {named(setting)} {exported}, not {asked}: "
                              f"pass the same value or export another program", param="program")


# -- the engine the training loop drives --------------------------------------------------------

def init_factors(params: dict[str, torch.Tensor], seed: int) -> None:
    """A Kaiming-uniform and B zero, as LoRALinear initialises them, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_A." in name:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
            else:
                p.zero_()


class ExecutorchEngine:
    """One loaded training program: `loss_and_grads` for a batch, `evaluate` on held-out rows.

    `params` are the program's LoRA factors (name -> tensor in the program's memory).
    """

    def __init__(self, program_dir: Path, manifest: dict, seed: int = 0, threads: Optional[int] = None):
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            _unsafe_reset_threadpool(threads)
        fields = manifest["executorch_train"]
        self.method, self.batch_size, self.seq_len = fields["method"], fields["batch_size"], fields["seq_len"]
        program_dir = Path(program_dir)
        self.module = TrainingModule(_load_for_executorch(str(program_dir / fields["program"]),
                                                          str(program_dir / fields["data"])))
        # The factors are outputs of the method, so one call hands them over; then they are
        # initialised for this run's seed (the values baked in at export are not used).
        self._run(_empty_batch(self.batch_size, self.seq_len, one_target=True))
        self.params = dict(self.module.named_parameters())
        if set(self.params) != set(fields["parameters"]):
            raise OdloraError(f"{program_dir}: the program's parameters do not match its manifest")
        init_factors(self.params, seed)

    def _run(self, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss and gradients of one batch, padded to the program's batch with rows of no loss."""
        ids, targets, segments = batch["input_ids"], batch["targets"], batch["segment_ids"]
        rows, T = ids.shape
        if T != self.seq_len or rows > self.batch_size:
            raise OdloraError(f"batch of {rows} x {T} tokens does not fit the program's {self.batch_size} x {self.seq_len}")
        if rows < self.batch_size:
            pad = _empty_batch(self.batch_size - rows, T)
            ids, targets, segments = (torch.cat((x, pad[k])) for x, k in
                                      ((ids, "input_ids"), (targets, "targets"), (segments, "segment_ids")))
        (loss,) = self.module.forward_backward(self.method, (ids.contiguous(), targets.contiguous(), segments.contiguous()))
        return float(loss), self.module.named_gradients()

    def loss_and_grads(self, batch: dict, scale: float) -> float:
        loss, grads = self._run(batch)
        for name, grad in grads.items():
            p = self.params[name]
            if p.grad is None:
                p.grad = grad.mul_(scale)
            else:
                p.grad.add_(grad, alpha=scale)
        return loss

    def evaluate(self, packed: PackedData) -> dict:
        """Same as `evaluate.evaluate_loss`, through the training program (its gradients unused)."""
        total, count = 0.0, 0
        for start in range(0, len(packed), self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = {"input_ids": packed.input_ids[rows], "targets": packed.targets[rows],
                     "segment_ids": packed.segment_ids[rows]}
            n = int((batch["targets"] != IGNORE).sum())
            if n:
                total, count = total + self._run(batch)[0] * n, count + n
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}

    def factors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Module name -> {"A": (r, in), "B": (out, r)}, copies in fp32."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.params.items():
            module, factor = factor_of(name)
            out.setdefault(module, {})[factor] = p.detach().float().clone()
        return out


def _empty_batch(rows: int, seq_len: int, one_target: bool = False) -> dict:
    """Padding rows that carry no loss (`one_target`: but one, so a call on them alone has a mean)."""
    targets = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    if one_target:
        targets[0, 0] = 0
    zeros = torch.zeros((rows, seq_len), dtype=torch.long)
    return {"input_ids": zeros, "targets": targets, "segment_ids": zeros.clone()}
