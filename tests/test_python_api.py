"""The front door: `from ondevice_lora import ...` (and `import odlora`) and the runnable example.

    python -m pytest -q tests/test_python_api.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import ondevice_lora

ROOT = Path(__file__).resolve().parents[1]


def test_every_documented_name_resolves():
    for name in ondevice_lora.__all__:
        assert getattr(ondevice_lora, name) is not None, name
    with pytest.raises(AttributeError):
        ondevice_lora.no_such_thing  # noqa: B018


def test_import_odlora_is_the_package_and_stays_light():
    code = ("import sys, odlora, ondevice_lora; assert odlora is ondevice_lora; "
            "assert 'torch' not in sys.modules, 'importing the package loaded torch'; print(odlora.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == ondevice_lora.__version__, result.stderr


def test_the_example_runs_the_whole_job(tiny_model_factory, tmp_path):
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("python_api_example", ROOT / "examples" / "python_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "example"
    answers = example.main(["--base", str(tiny_model_factory("llama")), "--steps", "2", "--out", str(out),
                            "--questions", "2", "--max-seq-len", "96"])
    assert len(answers) == 2 and all(set(a) == {None, "dates"} for a in answers.values())
    assert (out / "dates.onnx_adapter").is_file() and (out / "exports" / "onnx" / "manifest.json").is_file()
