"""Small datasets shipped with the package for demos and tests.

Two chat-format tasks with one exact answer per example:

* ``dates``: a free-form English date -> ``YYYY-MM-DD``;
* ``contacts``: a sentence about a person and a city ->
  ``{"name": "<Full Name>", "city": "<City>"}``.

Each has ``train`` (400) and ``test`` (100) splits of JSON lines
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``.
``general.txt`` is original encyclopedic prose for checking that an adapter
keeps general language modelling intact (perplexity).

Regenerate the task files with ``python -m ondevice_lora.samples.generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_TASKS = ("dates", "contacts")
SAMPLE_SPLITS = ("train", "test")

_ROOT = Path(__file__).resolve().parent


def sample_path(task: str, split: str = "train") -> Path:
    """Path of a task's ``.jsonl`` split; ``ValueError`` if either name is unknown."""
    if task not in SAMPLE_TASKS:
        raise ValueError(f"unknown sample task {task!r}; choose one of: {', '.join(SAMPLE_TASKS)}")
    if split not in SAMPLE_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SAMPLE_SPLITS)}")
    return _ROOT / task / f"{split}.jsonl"


def general_text_path() -> Path:
    """Path of ``general.txt``, plain prose unrelated to the sample tasks."""
    return _ROOT / "general.txt"


def load_examples(task: str, split: str = "train") -> list[dict]:
    """Read a split as a list of ``{"messages": [...]}`` chat examples."""
    with sample_path(task, split).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after ``str.strip()``.

    Returns 0.0 for empty lists; raises ``ValueError`` if the lengths differ.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(references)} references"
        )
    if not references:
        return 0.0
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)


def score(task: str, predictions: list[str], split: str = "test") -> float:
    """Exact match of ``predictions`` against the assistant answers of a split."""
    references = [ex["messages"][-1]["content"] for ex in load_examples(task, split)]
    return exact_match(predictions, references)
