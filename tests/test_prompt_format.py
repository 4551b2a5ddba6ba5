"""Train as you serve: an adapter's prompt format ("chat" or "raw") is recorded when it is trained,
carried by its packed blob and bundle, and applied by every runtime unless a request says otherwise.

    python -m pytest -q tests/test_prompt_format.py
"""

from __future__ import annotations

import json
import subprocess

import pytest

from ondevice_lora.adapter import load_adapter
from ondevice_lora.errors import OdloraError
from ondevice_lora.exporters.export import pack
from ondevice_lora.config import LoraConfig, PersonalizeConfig, SamplingConfig, TrainConfig
from ondevice_lora.personalization import personalize
from ondevice_lora.prompts import encode_prompt
from ondevice_lora.runtime import Runtime
from ondevice_lora.runtime.bundle import write_bundle
from ondevice_lora.train import underfit_hint
from conftest import run_cli
from test_native import native  # noqa: F401 (the native build fixture)
from test_runtime import PROMPT, make_adapter

SHORT = SamplingConfig(max_new_tokens=8)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"The cat sees {i} apples.", "completion": f" {i}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model_dir, data, out, prompt_format):
    cfg = PersonalizeConfig(base=str(model_dir), lora=LoraConfig(rank=4, alpha=8), seq_len=64, dtype="fp32",
                            base_quant="none", prompt_format=prompt_format,
                            training=TrainConfig(steps=2, batch_size=4, eval_every=0, save_every=0))
    personalize(cfg, data, out, say=lambda _: None)
    return out


@pytest.fixture(scope="module")
def formats(tiny_bundle, tmp_path_factory):
    """A chat adapter `c` and a raw one `r`, packed for the tiny bundle's export and bundled with it."""
    root = tmp_path_factory.mktemp("formats")
    dirs = {"c": make_adapter(tiny_bundle["base_dir"], root / "c", 3, 4, ALL_LINEAR),
            "r": make_adapter(tiny_bundle["base_dir"], root / "r", 4, 4, ALL_LINEAR)}
    meta = json.loads((dirs["r"] / "odlora.json").read_text())
    (dirs["r"] / "odlora.json").write_text(json.dumps({**meta, "prompt_format": "raw"}))
    blobs = {name: root / f"{name}.slots" for name in dirs}
    for name in dirs:
        pack(dirs[name], tiny_bundle["export"], blobs[name])
    write_bundle(tiny_bundle["export"], list(blobs.items()), root / "bundle")
    return {"dirs": dirs, "blobs": blobs, "bundle": root / "bundle", "export": tiny_bundle["export"]}


def test_personalize_records_the_format(tiny_llama_dir, pairs_jsonl, tmp_path):
    for fmt in ("chat", "raw"):
        out = train(tiny_llama_dir, pairs_jsonl, tmp_path / fmt, fmt)
        meta = json.loads((out / "odlora.json").read_text())
        assert meta["prompt_format"] == fmt and meta["data"]["prompt_format"] == fmt
        assert meta["data"]["kinds"] == {"prompt/completion": 24}  # train and validation rows
        assert load_adapter(out).prompt_format == fmt


def test_pack_and_bundle_carry_the_format(formats):
    for name, fmt in (("c", "chat"), ("r", "raw")):
        sidecar = json.loads(formats["blobs"][name].with_name(formats["blobs"][name].name + ".json").read_text())
        assert sidecar["prompt_format"] == fmt
    entries = json.loads((formats["bundle"] / "bundle.json").read_text())["adapters"]
    assert {a["id"]: a["prompt_format"] for a in entries} == {"c": "chat", "r": "raw"}


def test_the_runtime_asks_each_adapter_as_it_was_trained(formats):
    rt = Runtime.open_bundle(formats["bundle"], threads=1)
    raw = rt.generate(PROMPT, adapter="r", sampling=SHORT)
    assert raw.prompt_format == "raw" and raw.prompt_tokens == len(rt.tokenizer.encode(PROMPT))
    assert raw.token_ids == rt.generate(PROMPT, adapter="r", sampling=SHORT, chat=False).token_ids
    one_message = rt.generate([{"role": "user", "content": PROMPT}], adapter="r", sampling=SHORT)
    assert one_message.token_ids == raw.token_ids  # a chat client's single message, fed raw

    chat = rt.generate(PROMPT, adapter="c", sampling=SHORT)
    assert chat.prompt_format == "chat" and chat.prompt_tokens == len(encode_prompt(rt.tokenizer, PROMPT, chat=True))
    assert rt.generate(PROMPT, sampling=SHORT).prompt_format == "chat"  # the base

    with pytest.raises(OdloraError, match="one user message"):
        rt.generate([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}], adapter="r")
    with pytest.raises(OdloraError, match="different prompt formats"):
        rt.generate(PROMPT, adapter=[("c", 0.5), ("r", 0.5)])


def test_run_warns_in_one_line_when_asked_otherwise(formats, monkeypatch, capsys):
    blob = formats["blobs"]["r"]
    code, out, err = run_cli(monkeypatch, capsys, "run", "--export", formats["export"], "--adapter", blob,
                        "--prompt", PROMPT, "--max-new-tokens", "4")
    assert code == 0 and "warning" not in err
    code, out, err = run_cli(monkeypatch, capsys, "run", "--export", formats["export"], "--adapter", blob,
                        "--prompt", PROMPT, "--max-new-tokens", "4", "--chat")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1 and "trained on raw text" in warnings[0]


def test_generate_asks_a_raw_adapter_raw(tiny_bundle, formats, monkeypatch, capsys):
    """The PyTorch path (`odlora generate`) reads the format from the adapter directory."""
    args = ("generate", "--base", tiny_bundle["base_dir"], "--prompt", PROMPT, "--max-new-tokens", "6")
    code, raw_out, raw_err = run_cli(monkeypatch, capsys, *args, "--adapter", formats["dirs"]["r"])
    code2, forced_out, forced_err = run_cli(monkeypatch, capsys, *args, "--adapter", formats["dirs"]["r"], "--no-chat")
    assert code == code2 == 0 and raw_out == forced_out and not raw_err.strip()
    code, blended_out, blended_err = run_cli(monkeypatch, capsys, *args, "--adapter", formats["dirs"]["r"],
                            "--adapter", formats["dirs"]["c"])
    assert code == 2 and "different prompt formats" in blended_err


def test_native_runtime_applies_the_bundled_formats(native, formats, tmp_path):
    requests = tmp_path / "requests.jsonl"
    cases = [("r", None), ("c", None), ("r", True), ("base", None)]
    requests.write_text("".join(json.dumps({"adapter": a, "prompt": PROMPT, "max_new_tokens": 8,
                                            **({} if chat is None else {"chat": chat})}) + "\n" for a, chat in cases))
    done = subprocess.run([*native, str(formats["bundle"]), "--requests", str(requests)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rt = Runtime.open_bundle(formats["bundle"], threads=1)
    for (adapter, chat), line in zip(cases, done.stdout.splitlines(), strict=True):
        expected = rt.generate(PROMPT, adapter=None if adapter == "base" else adapter, sampling=SHORT, chat=chat)
        answer = json.loads(line)
        assert answer["prompt_tokens"] == expected.prompt_tokens and answer["token_ids"] == expected.token_ids


def test_dry_run_shows_how_a_row_is_read(tiny_llama_dir, pairs_jsonl, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", tiny_llama_dir, "--data", pairs_jsonl,
                        "--out", "unused", "--dry-run", "--seq-len", "64")
    assert code == 0
    assert "prompt format: chat" in out and "22 train / 2 val examples from 1 file(s) (24 prompt/completion)" in out
    assert "<|im_start|>user\\nThe cat sees" in out and "the part it learns to write" in out
    assert "steps: 40 of 8 rows" in out  # 3 epochs of this little data would be a handful of steps


def test_default_steps_scale_with_small_data():
    cfg = TrainConfig()
    assert cfg.total_steps(400) == 150  # 3 epochs of 50 batches
    assert cfg.total_steps(20) == 40  # at least 40 steps ...
    assert cfg.total_steps(8) == 20  # ... but no more than 20 passes over tiny data
    assert TrainConfig(epochs=1).total_steps(20) == 3  # an explicit --epochs is taken as it is


def test_underfit_hint():
    assert underfit_hint([2.0] * 8 + [1.5] * 4 + [1.0] * 4) is not None
    assert underfit_hint([2.0] * 8 + [1.0] * 8) is None  # flat at the end
    assert underfit_hint([2.0, 1.0]) is None  # too few steps to tell
    assert underfit_hint([0.06] * 8 + [0.05] * 4 + [0.02] * 4) is None  # falling, but already learnt
