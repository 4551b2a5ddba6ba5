"""Progress on long work: a bar for training (step, loss, tokens/s, ETA, and "validating" once the
last step is done; tqdm, on stderr) and named stages with their elapsed time for work with no steps to count (an
export: trace, quantise, lower, write).

    with TrainingProgress() as progress:
        personalize(..., progress=progress.update)
    stages = Stages(say)
    stages.start("tracing")          # "  [0:00] tracing ..."; each next stage says when it starts
    stages.done()                    # "  [4:12] done"
"""

from __future__ import annotations

import time
from typing import Callable

from tqdm import tqdm


class Stages:
    """Says each stage as it starts, with the time since the first one began."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.started = say, time.perf_counter()

    def start(self, name: str) -> None:
        self.say(f"  [{self.clock()}] {name} ...")

    def done(self) -> None:
        self.say(f"  [{self.clock()}] done")

    def clock(self) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        return f"{minutes}:{seconds:02d}"


class TrainingProgress:
    def __init__(self):
        self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def update(self, record: dict, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, initial=record["step"] - 1, unit="step", dynamic_ncols=True, desc="training")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if record["step"] == total:  # the final validation follows at once, and may take a minute
            self.bar.set_description_str("validating", refresh=False)
        self.bar.update(1)
