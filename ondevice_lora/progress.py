"""A terminal progress bar for training: step, loss, tokens/s and ETA (tqdm, on stderr)."""

from __future__ import annotations

from tqdm import tqdm


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
        self.bar.update(1)
