"""The `odlora` command line, in-process: bad input gives one clear line and exit code 2.

Also `base info --json`, `generate`, and the generation contract behind it (seeded sampling is
reproducible, stop strings cut the text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ondevice_lora.base import load_base
from ondevice_lora.config import SamplingConfig
from ondevice_lora.generate import generate_text
from ondevice_lora.prompts import encode_prompt, stop_token_ids
from conftest import run_cli


# -- bad input ------------------------------------------------------------------------------
def missing_dir(tmp, model, gguf):
    return tmp / "does-not-exist", "does-not-exist"


def dir_without_config(tmp, model, gguf):
    (tmp / "empty").mkdir()
    return tmp / "empty", "no config.json"


def truncated_safetensors(tmp, model, gguf):
    copy = Path(shutil.copytree(model, tmp / "model"))
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    return copy, "model.safetensors"


def garbled_safetensors(tmp, model, gguf):
    copy = Path(shutil.copytree(model, tmp / "model"))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[8:64] = b"\xff" * 56  # inside the JSON header
    (copy / "model.safetensors").write_bytes(bytes(data))
    return copy, "model.safetensors"


def gguf_cut_in_half(tmp, model, gguf):
    data = gguf.read_bytes()
    (tmp / "cut.gguf").write_bytes(data[: len(data) // 2])
    return tmp / "cut.gguf", "cut.gguf"


def gguf_cut_in_metadata(tmp, model, gguf):
    (tmp / "cut.gguf").write_bytes(gguf.read_bytes()[:200])
    return tmp / "cut.gguf", "cut.gguf"


def missing_gguf(tmp, model, gguf):
    return tmp / "nope.gguf", "nope.gguf"


def unknown_name(tmp, model, gguf):
    return "no-such-base", "no-such-base"


def unsupported_architecture(tmp, model, gguf):
    copy = Path(shutil.copytree(model, tmp / "model"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return copy, "gpt2"


def invalid_config_json(tmp, model, gguf):
    copy = Path(shutil.copytree(model, tmp / "model"))
    (copy / "config.json").write_text("{not json")
    return copy, "config.json"


BAD_BASES = [
    missing_dir,
    dir_without_config,
    truncated_safetensors,
    garbled_safetensors,
    gguf_cut_in_half,
    gguf_cut_in_metadata,
    missing_gguf,
    unknown_name,
    unsupported_architecture,
    invalid_config_json,
]
COMMANDS = {
    "base-info": lambda base: ["base", "info", base],
    "generate": lambda base: ["generate", "--base", base, "--prompt", "hi", "--max-new-tokens", "2"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("make_bad_base", BAD_BASES, ids=lambda f: f.__name__)
def test_bad_base_is_one_line_exit_2(monkeypatch, capsys, tmp_path, tiny_llama_dir, tiny_gguf_factory,
                                     make_bad_base, command):
    base, named = make_bad_base(tmp_path, tiny_llama_dir, tiny_gguf_factory("llama"))
    code, out, err = run_cli(monkeypatch, capsys, *COMMANDS[command](base))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("odlora: error:"), err
    assert named in lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
    ],
)
def test_bad_sampling_flags_exit_2(monkeypatch, capsys, tiny_llama_dir, flags, named):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--base", tiny_llama_dir, "--prompt", "hi", *flags)
    assert code == 2
    assert err.startswith("odlora: error:") and named in err and len(err.strip().splitlines()) == 1


# -- commands that work -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_base_info_json(monkeypatch, capsys, tiny_model_factory, variant):
    code, out, err = run_cli(monkeypatch, capsys, "base", "info", tiny_model_factory(variant), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["architecture"] == variant
    assert info["parameters"] == load_base(str(tiny_model_factory(variant))).n_params
    assert info["fingerprint"].startswith("sha256:") and len(info["fingerprint"]) == len("sha256:") + 64
    assert info["chat_template"] is True


def test_base_info_on_gguf(monkeypatch, capsys, tiny_gguf_factory):
    code, out, err = run_cli(monkeypatch, capsys, "base", "info", tiny_gguf_factory("llama"), "--json")
    assert code == 0, err
    assert json.loads(out)["architecture"] == "llama"


def test_generate_exits_0(monkeypatch, capsys, tiny_llama_dir):
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--base", tiny_llama_dir, "--prompt", "hi",
                             "--max-new-tokens", "5")
    assert code == 0, err
    assert out.endswith("\n")


# -- generation contract ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_generate(tiny_model_factory):
    base = load_base(str(tiny_model_factory("llama")))
    ids = encode_prompt(base.tokenizer, "What is the capital of France?")
    stops = stop_token_ids(base.tokenizer, base.config)

    def run(**sampling) -> str:
        return generate_text(base.model, base.tokenizer, ids, SamplingConfig(**sampling), stops)

    return run


@pytest.mark.parametrize(
    "sampling",
    [
        dict(max_new_tokens=24),  # greedy
        dict(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, seed=3),
    ],
    ids=["greedy", "seeded"],
)
def test_generation_is_reproducible(tiny_generate, sampling):
    first = tiny_generate(**sampling)
    assert first
    assert tiny_generate(**sampling) == first


def test_seed_changes_sampled_text(tiny_generate):
    texts = {tiny_generate(max_new_tokens=24, temperature=1.0, seed=s) for s in range(4)}
    assert len(texts) > 1


def test_stop_string_cuts_the_output(tiny_generate):
    full = tiny_generate(max_new_tokens=24)
    # An ASCII stop string from the middle of the greedy text (ASCII: never part of a split UTF-8 char).
    start = next(i for i in range(len(full) // 2, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].strip())
    stop = full[start : start + 2]
    cut = tiny_generate(max_new_tokens=24, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert stop not in cut
