"""Progress on long work (ondevice_lora/progress.py): an export's stages with their elapsed time,
and the training bar that says when it validates.

    python -m pytest -q tests/test_progress.py
"""

from __future__ import annotations

import re

import pytest

from ondevice_lora.progress import Stages, TrainingProgress


def test_stages_say_when_each_starts():
    said = []
    stages = Stages(said.append)
    stages.start("tracing")
    stages.done()
    assert said == ["  [0:00] tracing ...", "  [0:00] done"]


def test_an_onnx_export_says_its_stages_in_order(tiny_model_factory, tmp_path):
    pytest.importorskip("onnxscript")
    from ondevice_lora.exporters.export import export

    said = []
    export(str(tiny_model_factory("llama")), "onnx", tmp_path / "onnx", quant="int4", max_rank=4, max_seq_len=32,
           say=said.append)
    stages = [re.sub(r"^  \[\d+:\d\d\] ", "", line) for line in said[1:]]
    assert stages == ["tracing the model (torch.export) ...", "converting to ONNX ...",
                      "quantising the weights (int4) ...", "fusing attention, norms and adds ...",
                      "writing model.onnx ...", "writing manifest.json (each file's sha256) ...", "done"]


def test_the_training_bar_says_it_validates_after_the_last_step(capsys):
    with TrainingProgress() as progress:
        for step in (1, 2, 3):
            progress.update({"step": step, "loss": 1.0, "tokens_per_s": 100.0}, total=3)
            assert progress.bar.desc == ("validating" if step == 3 else "training")
