"""Quiet by default: `odlora run` on an export prints the answer and nothing else; `-v` shows the
libraries' own output. Run as a user runs it, in a fresh process: what the libraries print at
import and load time only shows there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ondevice_lora.config import SamplingConfig
from ondevice_lora.runtime import Runtime

PROMPT = "Hello there"


def odlora(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ODLORA_VERBOSE"}
    return subprocess.run([sys.executable, "-m", "ondevice_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def exports(tiny_bundle, tiny_model_factory, tmp_path_factory):
    """A tiny export per target that runs here (the ExecuTorch one is tiny_bundle's)."""
    from ondevice_lora.exporters.export import export

    onnx = tmp_path_factory.mktemp("quiet") / "onnx"
    export(str(tiny_model_factory("llama")), "onnx", onnx, max_rank=8, max_seq_len=64, say=lambda *_: None)
    return {"onnx": onnx, "executorch": tiny_bundle["export"]}


@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_run_prints_only_the_answer(exports, target):
    done = odlora("run", "--export", exports[target], "--prompt", PROMPT, "--max-new-tokens", 6)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    expected = Runtime.open(exports[target], threads=1).generate(PROMPT, sampling=SamplingConfig(max_new_tokens=6))
    assert done.stdout == expected.text + "\n"


def test_verbose_shows_what_executorch_prints(exports):
    done = odlora("-v", "run", "--export", exports["executorch"], "--prompt", PROMPT, "--max-new-tokens", 2)
    assert done.returncode == 0 and done.stderr != ""


def test_generate_prints_only_the_answer(tiny_model_factory):
    done = odlora("generate", "--base", tiny_model_factory("llama"), "--prompt", PROMPT, "--max-new-tokens", 4)
    assert done.returncode == 0 and done.stderr == "", done.stderr
