"""The settings of a personalisation and every default they have, in one place.

    LoraConfig          what is adapted and how strongly (rank, alpha, targets, layers)
    TrainConfig         the optimiser loop (steps or epochs, lr, batch, cadence of evals and checkpoints)
    PersonalizeConfig   a whole `personalize` run: the two above, the data's shape, the engine
    SamplingConfig      how a completion is decoded (generate, run, serve, chat)

The CLI, the demo, the web app and the server build these and leave unset what the user did not say, so a
default changes here and nowhere else; the CLI's `--help` reads them with `default_of`. This
module imports no torch, so `odlora --help` stays fast. Each config checks its own fields
(`bounds.py`); what needs the base or the machine is checked once they are known (`capacity.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .bounds import (ALPHA, DROPOUT, EPOCHS, LOGIT_BIAS, LR, NON_NEGATIVE_INT, PENALTY, POSITIVE_INT, SEED, SEQ_LEN,
                     TEMPERATURE, THREADS, TOP_P, VAL_SPLIT, Bound, check_fields)
from .errors import OdloraError
from .prompts import DEFAULT_PROMPT_FORMAT

# -- what LoRA adapts ---------------------------------------------------------------------------

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {
    "qv": ("q_proj", "v_proj"),  # the paper's choice
    "attn": ATTENTION,
    "all-linear": ATTENTION + MLP,  # the default, as QLoRA found best
}
DEFAULT_TARGETS = "all-linear"
LAYER_PRESETS = ("all", "middle")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: Optional[float] = None  # None: 2 x rank, the usual choice (16 at the default rank)
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_PRESETS[DEFAULT_TARGETS]  # module name suffixes
    layers: Optional[tuple[int, ...]] = None  # None: every layer
    use_rslora: bool = False

    def __post_init__(self):
        # The rank has no upper bound here: blends stack ranks and PEFT adapters come from elsewhere.
        # What a user may ask to train is bounds.RANK, and capacity.check_rank holds it to the base.
        if self.alpha is None and isinstance(self.rank, int):
            self.alpha = 2.0 * self.rank
        check_fields(self, {"rank": POSITIVE_INT, "alpha": ALPHA, "dropout": DROPOUT})
        self.targets = tuple(self.targets)
        self.layers = tuple(self.layers) if self.layers is not None else None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def parse_targets(spec: str) -> tuple[str, ...]:
    """`qv`, `attn`, `all-linear`, or a comma-separated list of module names (`q_proj,v_proj`).
    Which names the base has is checked by `lora.match_targets` once it is loaded."""
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise OdloraError(f"{spec!r} names no module (presets: {', '.join(TARGET_PRESETS)}, "
                          f"or module names such as q_proj,v_proj)", param="targets")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise OdloraError(f"{bad[0]!r} is not a module name (presets: {', '.join(TARGET_PRESETS)}, "
                          f"or module names such as q_proj,v_proj)", param="targets")
    return names


def check_layers_spec(spec: Optional[str]) -> None:
    """The syntax of a --layers spec, before the base (and so its layer count) is known."""
    if spec not in (None, "", *LAYER_PRESETS):
        _listed_layers(spec)


def parse_layers(spec: Optional[str], n_layers: int) -> Optional[tuple[int, ...]]:
    """`None`/`all`, `middle` (the middle third), `A-B` (inclusive) or `i,j,k`."""
    if spec in (None, "", "all"):
        return None
    if spec == "middle":
        third = n_layers // 3
        return tuple(range(third, n_layers - third))
    layers = _listed_layers(spec)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise OdloraError(f"{spec!r}: layer {bad[0]} is outside 0-{n_layers - 1}", param="layers")
    return layers


def _listed_layers(spec: str) -> tuple[int, ...]:
    """`A-B` (A <= B) or `i,j,k` as layer numbers."""
    if m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec):
        if int(m[1]) > int(m[2]):
            raise OdloraError(f"{spec!r}: a range A-B needs A <= B", param="layers")
        return tuple(range(int(m[1]), int(m[2]) + 1))
    if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", spec):
        return tuple(int(i) for i in spec.split(","))
    raise OdloraError(f"{spec!r}: expected 'all', 'middle', 'A-B' or 'i,j,k' (layer numbers from 0)", param="layers")


# -- the optimiser loop -------------------------------------------------------------------------

DEFAULT_EPOCHS = 3.0
MIN_DEFAULT_STEPS = 40  # what the shipped tasks need to reach 0.8-0.9 exact match (demo: 40 steps of 8 rows)
MAX_DEFAULT_EPOCHS = 20  # ...but no more passes than this over a very small file


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # optimiser steps; None: derive from the data (see total_steps)
    epochs: Optional[float] = None  # passes over the data; None: DEFAULT_EPOCHS, with at least MIN_DEFAULT_STEPS
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50  # steps; 0: only before and after
    save_every: int = 100  # steps; 0: no periodic checkpoint
    early_stopping: int = 0  # evaluations without improvement before stopping; 0: never
    activation_checkpointing: bool = False
    compile: bool = False  # TorchInductor for the decoder layers' training steps

    def validate(self):
        """Every field's range (bounds.py), before anything loads; an error names the field."""
        check_fields(self, {
            "steps": POSITIVE_INT, "epochs": EPOCHS, "lr": LR, "batch_size": POSITIVE_INT, "grad_accum": POSITIVE_INT,
            "seed": SEED, "eval_every": NON_NEGATIVE_INT, "save_every": NON_NEGATIVE_INT, "early_stopping": NON_NEGATIVE_INT,
            # not flags, but a library caller's NaN here would train a NaN adapter
            "warmup": Bound(0, 1), "weight_decay": Bound(0), "max_grad_norm": Bound(0, low_open=True),
        })
        if self.compile and self.activation_checkpointing:
            raise OdloraError("cannot be used together with activation checkpointing", param="compile")

    def total_steps(self, n_rows: int) -> int:
        """--steps, else --epochs passes over the rows; with neither, DEFAULT_EPOCHS but at least
        MIN_DEFAULT_STEPS (and at most MAX_DEFAULT_EPOCHS passes): 3 epochs of a user's 50-line
        file are 6 steps, which leaves the adapter underfit (validation loss 4.84 -> 1.62 there)."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_rows / (self.batch_size * self.grad_accum))
        if self.epochs is not None:
            return max(1, round(per_epoch * self.epochs))
        return max(round(per_epoch * DEFAULT_EPOCHS), min(MIN_DEFAULT_STEPS, per_epoch * MAX_DEFAULT_EPOCHS))


# -- a whole personalisation --------------------------------------------------------------------

COMPUTE_DTYPES = ("auto", "bf16", "fp32")  # auto: bf16 where the CPU computes it natively (devices.py)
ENGINES = ("torch", "executorch")
BASE_QUANTS = ("none", "int8", "int4")
# How the frozen base is held per engine: int8 is the fastest of the three at equal quality on a
# 2-core CPU (bench/bench_train.py); an ExecuTorch training program runs fp32 weights or int8.
DEFAULT_BASE_QUANT = {"torch": "int8", "executorch": "none"}


@dataclass
class PersonalizeConfig:
    base: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 128
    val_split: float = 0.1
    val_data: Optional[Path] = None
    base_quant: Optional[str] = None  # None: DEFAULT_BASE_QUANT of the engine
    dtype: str = "auto"  # bf16 where the CPU computes it natively, else fp32 (devices.py)
    layers: str = "all"  # parsed once the base's layer count is known
    train_on_prompt: bool = False
    prompt_format: str = DEFAULT_PROMPT_FORMAT  # how prompt/completion rows are rendered, and later served
    threads: Optional[int] = None
    engine: str = "torch"  # or "executorch"
    program: Optional[Path] = None  # executorch: an exported training program (default: cached per base/shape)

    def __post_init__(self):
        if self.base_quant is None:
            self.base_quant = DEFAULT_BASE_QUANT.get(self.engine)

    def validate(self) -> None:
        """Every setting that needs no base, before anything loads: a bad flag costs nothing.
        What needs the base (its context, its linears, this machine's RAM) is `personalization.check_fits`."""
        if self.dtype not in COMPUTE_DTYPES:
            raise OdloraError(f"{self.dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}", param="dtype")
        if self.engine not in ENGINES:
            raise OdloraError(f"{self.engine!r} is not one of {', '.join(ENGINES)}", param="engine")
        check_fields(self, {"seq_len": SEQ_LEN, "val_split": VAL_SPLIT, "threads": THREADS})
        check_layers_spec(self.layers)
        self.training.validate()


# -- generation ---------------------------------------------------------------------------------

@dataclass
class SamplingConfig:
    """How each next token is chosen. The penalties, the bias and the grammar change the logits
    before temperature/top-k/top-p (or greedy) pick from them."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # subtracted once from each token already generated (OpenAI's formula)
    frequency_penalty: float = 0.0  # subtracted once per time a token was already generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    grammar: Optional[str] = None  # an llguidance grammar (grammar.py) every answer must match

    def validate(self):
        """Every field's range (bounds.py); an error names the field."""
        check_fields(self, {"max_new_tokens": POSITIVE_INT, "temperature": TEMPERATURE, "top_k": NON_NEGATIVE_INT,
                            "top_p": TOP_P, "seed": SEED, "presence_penalty": PENALTY,
                            "frequency_penalty": PENALTY})
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise OdloraError(f"each stop is a non-empty string, got {self.stop!r}", param="stop")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise OdloraError(f"{token!r} is not a token id", param="logit_bias")
            LOGIT_BIAS.check(bias, "logit_bias")


def default_of(config: type, name: str):
    """The default of a config's field, for a `--help` line or a caller that builds its own config."""
    spec = config.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default
