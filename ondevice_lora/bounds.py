"""The range of every number a user gives us, in one table, and the one check that enforces it.

    RANK.check(100000, "rank")   # OdloraError: rank: must be an integer from 1 to 256, got 100000
    check_fields(cfg, {"lr": LR, "seed": SEED})   # each field against its bound; an error names the field

(the CLI prints the parameter as its flag: `--rank: must be ...`; errors.OdloraError.for_cli)

The library configs' `validate()` (TrainConfig, LoraConfig, SamplingConfig, PersonalizeConfig,
DemoConfig) check their fields here, and the CLI turns the same bounds into click types
(`cli.Bounded`), so a flag and the config field it sets can never disagree. A bound is also a
type check: an integer bound refuses floats and bools, and every bound refuses NaN and the
infinities (Python's float() and JSON both accept them). Limits that need the base or the
machine (a rank against the linears' sizes, seq-len against the context and RAM) are in
`capacity.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import OdloraError


@dataclass(frozen=True)
class Bound:
    """A closed (or, with low_open/high_open, half-open) interval of finite numbers, integers only
    when `integer`; None leaves that side unbounded."""

    low: Optional[float] = None
    high: Optional[float] = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> Optional[str]:
        """What is wrong with `value` ("must be ..., got ..."), or None when it is in bounds."""
        if not self.holds(value):
            return f"must be {self.describe()}, got {value!r}"
        return None

    def check(self, value, name: str):
        """`value` when it is in bounds; otherwise OdloraError about the parameter `name`."""
        problem = self.problem(value)
        if problem:
            raise OdloraError(problem, param=name)
        return value

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{kind} from {_num(self.low)} to {_num(self.high)}"
        sides = [f"{'>' if self.low_open else '>='} {_num(self.low)}"] if self.low is not None else []
        sides += [f"{'<' if self.high_open else '<='} {_num(self.high)}"] if self.high is not None else []
        return f"{kind} {' and '.join(sides)}" if sides else f"a finite {kind.split()[-1]}"


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) and abs(x) >= 10**6 else f"{x:g}" if isinstance(x, float) else str(x)


def check_fields(obj, bounds: dict[str, Bound]) -> None:
    """Check each named field of `obj` against its bound (None: not set, skipped); an error names the field."""
    for field, bound in bounds.items():
        value = getattr(obj, field)
        if value is not None:
            bound.check(value, field)


# -- the bounds ---------------------------------------------------------------------------------
# Why these limits: a rank above 256 is never low-rank for the bases we load (hidden sizes of
# 576-4096) and its adapter is as big as a fine-tune; AdamW diverges at once well below an lr of
# 10 (tests/test_personalize.py uses 5 to make it), so more is a typo (1e3 for 1e-3); 1024
# threads is more cores than any machine this runs on; temperature follows OpenAI's 0-2; seeds
# are what torch.Generator takes and JSON clients can send exactly (int64); a port is 16 bits.

MAX_RANK = 256
MAX_THREADS = 1024
MAX_SEED = 2**63 - 1

RANK = Bound(1, MAX_RANK, integer=True)  # --rank, --max-rank: what a user may ask to train or export
POSITIVE_INT = Bound(1, integer=True)  # batch size, grad accumulation, steps, max-new-tokens, counts
NON_NEGATIVE_INT = Bound(0, integer=True)  # eval/save-every, early-stopping, top-k (0: off)
ALPHA = Bound(0, low_open=True)
DROPOUT = Bound(0, 1, high_open=True)
LR = Bound(0, 10, low_open=True)
EPOCHS = Bound(0, 10_000, low_open=True)
VAL_SPLIT = Bound(0, 0.5)  # a validation split above half leaves too little to train on
SEQ_LEN = Bound(8, integer=True)  # training rows: shorter ones hold no prompt and answer
EXPORT_SEQ_LEN = Bound(16, integer=True)  # an export's KV cache: a chat template alone takes ~10 tokens
SEED = Bound(0, MAX_SEED, integer=True)
THREADS = Bound(1, MAX_THREADS, integer=True)
TEMPERATURE = Bound(0, 2)
TOP_P = Bound(0, 1, low_open=True)
PENALTY = Bound(-2, 2)  # presence/frequency penalty: OpenAI's range
LOGIT_BIAS = Bound(-100, 100)  # OpenAI's range: -100 bans a token, 100 all but forces it
ADAPTER_WEIGHT = Bound()  # a blend weight: any finite number (negative subtracts an adapter)
PORT = Bound(0, 65535, integer=True)  # 0: any free port
