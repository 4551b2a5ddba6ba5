"""`personalize` end to end on a tiny model: learning, determinism, resume, Ctrl-C, no clobbering."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ondevice_lora.errors import OdloraError
from ondevice_lora.config import LoraConfig, PersonalizeConfig, TrainConfig
from ondevice_lora.personalization import checkpoint_dir, personalize
from ondevice_lora.samples import load_examples
from ondevice_lora.train import find_cxx_compiler
from conftest import run_cli


@pytest.fixture(scope="module")
def dates_jsonl(tmp_path_factory):
    """60 examples of the shipped `dates` task (short enough for the tiny tokenizer's 128 positions)."""
    path = tmp_path_factory.mktemp("data") / "dates.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in load_examples("dates", "train")[:60]))
    return path


def config(model_dir, **training):
    return PersonalizeConfig(
        base=str(model_dir), lora=LoraConfig(rank=4, alpha=8), seq_len=128, dtype="fp32", base_quant="none",
        training=TrainConfig(**{"steps": 12, "lr": 2e-2, "batch_size": 4, "eval_every": 0, "save_every": 0, **training}),
    )


def weights(adapter_dir):
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def quiet(_msg):
    pass


def test_training_lowers_validation_loss_and_writes_a_complete_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    metrics = personalize(config(tiny_llama_dir), dates_jsonl, tmp_path / "ad", say=quiet)
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    assert metrics["steps"] == 12
    meta = json.loads((tmp_path / "ad" / "odlora.json").read_text())
    assert meta["base_fingerprint"].startswith("sha256:") and meta["data"]["examples"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors", "odlora.json", "train_log.jsonl"} <= {
        p.name for p in (tmp_path / "ad").iterdir()}
    assert not checkpoint_dir(tmp_path / "ad").exists()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_training_on_a_quantised_base_in_bf16(tiny_llama_dir, dates_jsonl, tmp_path, quant):
    cfg = config(tiny_llama_dir)
    cfg.base_quant, cfg.dtype = quant, "bf16"
    metrics = personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet)
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]


def test_same_seed_same_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=4), dates_jsonl, tmp_path / "a", say=quiet)
    personalize(config(tiny_llama_dir, steps=4), dates_jsonl, tmp_path / "b", say=quiet)
    personalize(config(tiny_llama_dir, steps=4, seed=1), dates_jsonl, tmp_path / "c", say=quiet)
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Interrupt:
    """A progress callback that presses Ctrl-C after `at` steps."""

    def __init__(self, at):
        self.at = at

    def __call__(self, record, total):
        if record["step"] == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_checkpoints_and_resume_finishes_bit_identically(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=8), dates_jsonl, tmp_path / "straight", say=quiet)
    cfg = config(tiny_llama_dir, steps=8, save_every=3)
    said = []
    with pytest.raises(KeyboardInterrupt):
        personalize(cfg, dates_jsonl, tmp_path / "ad", say=said.append, progress=Interrupt(at=5))
    # --out held nothing: the adapter of step 5 is kept there, and the run is checkpointed at step 5, not 3
    assert json.loads((tmp_path / "ad" / "odlora.json").read_text())["interrupted"] is True
    assert json.loads((checkpoint_dir(tmp_path / "ad") / "state.json").read_text())["step"] == 5
    assert str(checkpoint_dir(tmp_path / "ad")) in said[-1] and "--resume" in said[-1]
    personalize(cfg, dates_jsonl, tmp_path / "ad", resume=True, say=quiet)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "ad")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not checkpoint_dir(tmp_path / "ad").exists()


def test_ctrl_c_never_replaces_an_existing_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=2), dates_jsonl, tmp_path / "ad", say=quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    said = []
    with pytest.raises(KeyboardInterrupt):
        personalize(config(tiny_llama_dir, steps=8, seed=1), dates_jsonl, tmp_path / "ad", say=said.append,
                    progress=Interrupt(at=3), force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    assert f"{tmp_path / 'ad'} is unchanged" in said[-1]
    assert json.loads((checkpoint_dir(tmp_path / "ad") / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("damage", ["tensors", "state"])
def test_resume_refuses_a_torn_or_damaged_checkpoint(tiny_llama_dir, dates_jsonl, tmp_path, damage):
    cfg = config(tiny_llama_dir, steps=8, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet, progress=Interrupt(at=3), force=True)
    ckpt = checkpoint_dir(tmp_path / "ad")
    if damage == "tensors":  # one flipped byte in the factors
        data = bytearray((ckpt / "state.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ckpt / "state.safetensors").write_bytes(bytes(data))
    else:  # a torn pair as the old two-rename writer could leave: state.json of another step
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": 2, "sha256": "0" * 64}))
    with pytest.raises(OdloraError, match="torn or damaged"):
        personalize(cfg, dates_jsonl, tmp_path / "ad", resume=True, say=quiet)


@pytest.mark.parametrize("lora, training, message", [
    ({"alpha": float("nan")}, {}, "alpha: must be a number > 0, got nan"),
    ({}, {"lr": float("inf")}, "lr: must be a number > 0 and <= 10, got inf"),
    ({}, {"epochs": float("nan"), "steps": None}, "epochs: must be a number > 0 and <= 10000, got nan"),
])
def test_non_finite_settings_are_refused_by_the_library(tiny_llama_dir, dates_jsonl, tmp_path, lora, training, message):
    with pytest.raises(OdloraError, match="^" + message):  # the library names the setting, the CLI its flag
        cfg = config(tiny_llama_dir, **training)
        cfg.lora = LoraConfig(rank=4, **{"alpha": 8, **lora})
        personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet)
    assert not (tmp_path / "ad").exists()


def test_a_diverging_run_stops_and_keeps_the_old_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=2), dates_jsonl, tmp_path / "ad", say=quiet)
    before = weights(tmp_path / "ad")
    cfg = config(tiny_llama_dir, steps=4)
    cfg.lora = LoraConfig(rank=4, alpha=1e38)  # finite, but the scaled update overflows to inf
    with pytest.raises(OdloraError, match="training diverged at step 1"):
        personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet, force=True)
    after = weights(tmp_path / "ad")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_a_different_config_is_refused(tiny_llama_dir, dates_jsonl, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        personalize(config(tiny_llama_dir, steps=8, save_every=2), dates_jsonl, tmp_path / "ad", say=quiet,
                    progress=Interrupt(at=3))
    with pytest.raises(OdloraError, match="different"):
        personalize(config(tiny_llama_dir, steps=8, save_every=2, lr=1e-4), dates_jsonl, tmp_path / "ad",
                    resume=True, say=quiet)


def test_a_failed_run_never_clobbers_an_existing_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=2), dates_jsonl, tmp_path / "ad", say=quiet)
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()

    def crash(record, total):
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        personalize(config(tiny_llama_dir, steps=4), dates_jsonl, tmp_path / "ad", say=quiet, progress=crash, force=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(OdloraError):
        personalize(config(tiny_llama_dir), empty, tmp_path / "ad", say=quiet, force=True)
    with pytest.raises(OdloraError, match="already exists \\(use force"):  # the library names the setting
        personalize(config(tiny_llama_dir), dates_jsonl, tmp_path / "ad", say=quiet)
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before



@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank"),
    (["--targets", "c_attn"], "match no linear"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--seq-len", "4"], "--seq-len"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_llama_dir, dates_jsonl, tmp_path, monkeypatch, capsys, flags, message):
    args = ["personalize", "--base", tiny_llama_dir, "--data", dates_jsonl, "--out", tmp_path / "ad", "--steps", 1]
    code, out, err = run_cli(monkeypatch, capsys, *args, *flags)
    assert code == 2
    assert err.startswith("odlora: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()


def test_no_trainable_tokens_is_an_error(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a long prompt with nothing to learn", "completion": ""}\n' * 4)
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", tiny_llama_dir, "--data", data,
                        "--out", tmp_path / "ad", "--steps", 1, "--seq-len", 8)
    assert code == 2 and "trainable" in err


def test_cli_json_prints_the_metrics_last(tiny_llama_dir, dates_jsonl, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", tiny_llama_dir, "--data", dates_jsonl,
                        "--out", tmp_path / "ad", "--steps", 2, "--batch-size", 4, "--dtype", "fp32", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["val_loss"] > 0


def test_activation_checkpointing_gives_the_same_adapter(tiny_llama_dir, dates_jsonl, tmp_path):
    personalize(config(tiny_llama_dir, steps=3), dates_jsonl, tmp_path / "plain", say=quiet)
    personalize(config(tiny_llama_dir, steps=3, activation_checkpointing=True), dates_jsonl, tmp_path / "ckpt", say=quiet)
    plain, ckpt = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_early_stopping_ends_the_run(tiny_llama_dir, dates_jsonl, tmp_path):
    # A learning rate this high makes validation loss worse at once; patience 1 stops at the first check.
    metrics = personalize(config(tiny_llama_dir, steps=40, lr=5.0, eval_every=2, early_stopping=1),
                          dates_jsonl, tmp_path / "ad", say=quiet)
    assert metrics["steps"] < 40


@pytest.mark.slow  # TorchInductor compiles for tens of seconds, even for a tiny model
@pytest.mark.skipif(find_cxx_compiler() is None, reason="--compile needs a C++ compiler")
def test_compile_trains_like_eager(tiny_llama_dir, dates_jsonl, tmp_path):
    eager = personalize(config(tiny_llama_dir, steps=3), dates_jsonl, tmp_path / "eager", say=quiet)
    compiled = personalize(config(tiny_llama_dir, steps=3, compile=True), dates_jsonl, tmp_path / "compiled", say=quiet)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--activation-checkpointing"], "cannot be used together"),
    (["--compile", "--engine", "executorch"], "--compile: is not supported by the executorch engine"),
])
def test_compile_refuses_what_it_cannot_do(tiny_llama_dir, dates_jsonl, tmp_path, monkeypatch, capsys, flags, message):
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", tiny_llama_dir, "--data", dates_jsonl,
                        "--out", tmp_path / "ad", "--steps", 1, *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "ad").exists()


def test_compile_without_a_cxx_compiler_says_so(tiny_llama_dir, dates_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(OdloraError, match="needs a C\\+\\+ compiler"):
        personalize(config(tiny_llama_dir, steps=1, compile=True), dates_jsonl, tmp_path / "ad", say=quiet)
