"""On-device training: an exported ExecuTorch LoRA training program and the trainer that drives it.

    python -m pytest -q tests/test_device_train.py                 # tiny models; one export (~15 s)
    ODLORA_HOME=/tmp/oh python -m pytest -q tests/test_device_train.py -m slow -s   # default base, minutes

The oracle is PyTorch autograd on the same model (`TrainStep`) and the laptop path (`--engine torch`).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("executorch")

from ondevice_lora.adapter import attach_adapter, load_adapter  # noqa: E402
from ondevice_lora.base import load_base  # noqa: E402
from ondevice_lora.data import batches, pack, read_examples  # noqa: E402
from ondevice_lora.device_train import ExecutorchEngine, read_program  # noqa: E402
from ondevice_lora.errors import OdloraError  # noqa: E402
from ondevice_lora.evaluate import task_accuracy  # noqa: E402
from ondevice_lora.exporters.executorch_train import lora_parameters, training_step  # noqa: E402
from ondevice_lora.exporters.export import export, export_trainable, pack as pack_adapter  # noqa: E402
from ondevice_lora.config import LoraConfig, PersonalizeConfig, TrainConfig  # noqa: E402
from ondevice_lora.personalization import personalize  # noqa: E402
from ondevice_lora.prompts import encode_prompt, stop_token_ids  # noqa: E402
from ondevice_lora.samples import load_examples, sample_path  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_personalize import Interrupt  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8)
BATCH, SEQ = 4, 128


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def dates_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dates.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in load_examples("dates", "train")[:60]))
    return path


@pytest.fixture(scope="module")
def program(tiny_model_factory, tmp_path_factory):
    """(base_dir, program_dir): the tiny Llama's training program, rank 4 on all linears, 4 x 128."""
    torch.set_num_threads(1)
    base_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("program") / "prog"
    export_trainable(load_base(str(base_dir)), out, LORA, BATCH, SEQ, say=quiet)
    return base_dir, out


def config(base_dir, program_dir, **training):
    return PersonalizeConfig(
        base=str(base_dir), lora=LORA, seq_len=SEQ, dtype="fp32", base_quant="none", engine="executorch",
        program=program_dir,
        training=TrainConfig(**{"steps": 12, "lr": 2e-2, "batch_size": BATCH, "eval_every": 0, "save_every": 0, **training}),
    )


@pytest.fixture(scope="module")
def program_int8(tiny_model_factory, tmp_path_factory):
    """The same with the frozen decoder linears held as int8."""
    torch.set_num_threads(1)
    base_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("program") / "prog-int8"
    export_trainable(load_base(str(base_dir)), out, LORA, BATCH, SEQ, say=quiet, base_quant="int8")
    return base_dir, out


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_gradients_equal_pytorch_autograd(request, dates_jsonl, quant):
    base_dir, program_dir = request.getfixturevalue("program" if quant == "none" else "program_int8")
    base = load_base(str(base_dir))
    packed = pack(read_examples(dates_jsonl, base.tokenizer, SEQ), SEQ, base.tokenizer.pad_token_id)
    batch = next(batches(packed, 3, seed=0, epoch=0))  # 3 rows: the program pads to 4 with rows of no loss
    assert batch["segment_ids"].max() > 0, "rows must pack several examples"

    engine = ExecutorchEngine(program_dir, read_program(program_dir))
    step = training_step(base.model, LORA, quant)  # the same (quantised) base in PyTorch
    reference = lora_parameters(step)
    torch.manual_seed(1)
    with torch.no_grad():  # B away from zero, so that every factor gets a gradient
        for name, p in engine.params.items():
            p.normal_(0.0, 0.1)
            reference[name].copy_(p)
    loss = engine.loss_and_grads(batch, 1.0)
    (expected,) = step(batch["input_ids"], batch["targets"], batch["segment_ids"])
    expected.backward()
    assert abs(loss - expected.item()) <= 1e-5
    diffs = {n: (p.grad - reference[n].grad).abs().max().item() for n, p in engine.params.items()}
    assert set(diffs) == set(reference) and len(diffs) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    print(f"max |grad diff| {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= 1e-4
    assert all(p.grad.abs().max() > 0 for p in engine.params.values())


def test_int8_base_trains(program, program_int8, dates_jsonl, tmp_path):
    base_dir, program_dir = program_int8
    cfg = config(base_dir, program_dir)
    cfg.base_quant = "int8"
    metrics = personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet)
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    assert json.loads((tmp_path / "ad" / "odlora.json").read_text())["base_quant"] == "int8"
    fp32_base, int8_base = ((p[1] / "train.ptd").stat().st_size for p in (program, program_int8))
    print(f"train.ptd: fp32 base {fp32_base} bytes, int8 {int8_base}")
    assert int8_base < 0.7 * fp32_base  # the tiny model's embedding and head stay fp32


def test_training_lowers_the_loss_and_the_adapter_packs_and_runs(program, dates_jsonl, tmp_path):
    from ondevice_lora.runtime import Runtime

    base_dir, program_dir = program
    metrics = personalize(config(base_dir, program_dir), dates_jsonl, tmp_path / "ad", say=quiet)
    assert metrics["steps"] == 12 and metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    meta = json.loads((tmp_path / "ad" / "odlora.json").read_text())
    assert meta["engine"] == "executorch" and meta["base_fingerprint"] == load_base(str(base_dir)).fingerprint
    assert {"adapter_config.json", "adapter_model.safetensors", "odlora.json", "train_log.jsonl"} <= {
        p.name for p in (tmp_path / "ad").iterdir()}

    # The existing packer and runtime take it, and it answers as our PyTorch model with it attached.
    export(str(base_dir), "onnx", tmp_path / "onnx", max_rank=8, max_seq_len=64, say=quiet)
    pack_adapter(tmp_path / "ad", tmp_path / "onnx", tmp_path / "ad.onnx_adapter")
    rt = Runtime.open(tmp_path / "onnx", threads=1)
    rt.register_adapter("ad", tmp_path / "ad.onnx_adapter")
    reference = load_base(str(base_dir))
    attach_adapter(reference.model, load_adapter(tmp_path / "ad"))
    prompt = encode_prompt(reference.tokenizer, "Normalise the date: 3 March 2021")
    from ondevice_lora.config import SamplingConfig
    from ondevice_lora.generate import generate_text

    greedy = SamplingConfig(max_new_tokens=8)
    expected = generate_text(reference.model, reference.tokenizer, prompt, greedy,
                             stop_token_ids(reference.tokenizer, reference.config))
    assert rt.generate("Normalise the date: 3 March 2021", adapter="ad", sampling=greedy).text == expected


def test_same_steps_as_the_laptop_path_reach_its_loss(program, dates_jsonl, tmp_path):
    """Same data, steps, rank and batches on the tiny model: the two engines end within 2%."""
    base_dir, program_dir = program
    device = personalize(config(base_dir, program_dir, steps=8), dates_jsonl, tmp_path / "et", say=quiet)
    laptop_cfg = config(base_dir, program_dir, steps=8)
    laptop_cfg.engine = "torch"
    laptop = personalize(laptop_cfg, dates_jsonl, tmp_path / "pt", say=quiet)
    assert device["val_loss_before"] == pytest.approx(laptop["val_loss_before"], rel=1e-5)
    assert device["val_loss"] == pytest.approx(laptop["val_loss"], rel=0.02)


def test_checkpoint_and_resume_finish_as_a_straight_run(program, dates_jsonl, tmp_path):
    base_dir, program_dir = program
    personalize(config(base_dir, program_dir, steps=6), dates_jsonl, tmp_path / "straight", say=quiet)
    cfg = config(base_dir, program_dir, steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        personalize(cfg, dates_jsonl, tmp_path / "ad", say=quiet, progress=Interrupt(at=3))
    assert json.loads((tmp_path / "ad" / "odlora.json").read_text())["interrupted"] is True  # --out held nothing
    personalize(cfg, dates_jsonl, tmp_path / "ad", resume=True, say=quiet)
    straight, resumed = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "ad")
    assert all(torch.allclose(straight.B[n], resumed.B[n], atol=1e-6) for n in straight.B)


def test_a_failed_run_never_clobbers_an_existing_adapter(program, dates_jsonl, tmp_path):
    base_dir, program_dir = program
    personalize(config(base_dir, program_dir, steps=2), dates_jsonl, tmp_path / "ad", say=quiet)
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()

    def crash(record, total):
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        personalize(config(base_dir, program_dir, steps=4), dates_jsonl, tmp_path / "ad", say=quiet, progress=crash,
                    force=True)
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging directory left behind


@pytest.mark.parametrize("flags, data, message", [
    (["--rank", "0"], None, "--rank"),
    ([], '{"prompt": "a", "completion": "b"}\n{not json\n', "bad.jsonl:2"),
    (["--rank", "8"], None, "--rank 4"),  # the program was exported at rank 4
    (["--batch-size", "2"], None, "--batch-size 4"),
    (["--dropout", "0.1"], None, "--dropout"),
    (["--base-quant", "int8"], None, "--base-quant none"),  # the program holds an fp32 base
    (["--base-quant", "int4"], None, "none|int8"),
])
def test_cli_bad_input_exits_2_and_keeps_the_old_adapter(program, dates_jsonl, tmp_path, monkeypatch, capsys,
                                                         flags, data, message):
    base_dir, program_dir = program
    personalize(config(base_dir, program_dir, steps=1), dates_jsonl, tmp_path / "ad", say=quiet)
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    if data is not None:
        (tmp_path / "bad.jsonl").write_text(data)
    code, _, err = run_cli(monkeypatch, capsys, "personalize", "--engine", "executorch", "--program", program_dir,
                           "--data", tmp_path / "bad.jsonl" if data else dates_jsonl, "--out", tmp_path / "ad",
                           "--rank", "4", "--alpha", "8", "--batch-size", BATCH, "--steps", 1, "--force", *flags)
    assert code == 2, err
    assert err.startswith("odlora: error:") and message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "bad.jsonl") == ["ad"]


def test_cli_exports_a_program_and_trains_with_it(tiny_llama_dir, dates_jsonl, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ODLORA_HOME", str(tmp_path / "home"))
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--engine", "executorch", "--base", tiny_llama_dir,
                             "--data", dates_jsonl, "--out", tmp_path / "ad", "--rank", 2, "--batch-size", 2,
                             "--seq-len", 128, "--steps", 2, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2 and math.isfinite(result["val_loss"])
    programs = list((tmp_path / "home" / "train-programs").iterdir())
    assert len(programs) == 1 and read_program(programs[0])["executorch_train"]["batch_size"] == 2


def test_export_trainable_cli_refuses_other_targets(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", "--base", tiny_llama_dir, "--target", "onnx", "--trainable",
                           "--out", tmp_path / "p")
    assert code == 2 and "--target executorch" in err and not (tmp_path / "p").exists()
    with pytest.raises(OdloraError, match="not an odlora export"):
        read_program(tmp_path)


# -- the default base ---------------------------------------------------------------------------

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_SEQ = 16, 4, 128  # the program's portable kernels take ~15 s a step
TEST_EXAMPLES = 20


def exact_match(adapter_dir) -> float:
    base = load_base()
    if adapter_dir is not None:
        attach_adapter(base.model, load_adapter(adapter_dir))
    return task_accuracy(base.model, base.tokenizer, load_examples("dates", "test")[:TEST_EXAMPLES],
                         stop_token_ids(base.tokenizer, base.config))["exact_match"]


@pytest.mark.slow
@pytest.mark.heavy  # over 20 minutes on CI's AVX2-only EPYC (portable kernels), against 10 on AVX-512
def test_default_base_reaches_the_laptop_loss_and_learns_the_task(default_base, tmp_path):
    lora = LoraConfig(rank=8, alpha=16)
    export_trainable(default_base, tmp_path / "prog", lora, DEFAULT_BATCH, DEFAULT_SEQ, say=print)
    training = {"steps": DEFAULT_STEPS, "lr": 2e-3, "batch_size": DEFAULT_BATCH, "eval_every": 0, "save_every": 0}
    device = personalize(PersonalizeConfig(lora=lora, seq_len=DEFAULT_SEQ, engine="executorch", program=tmp_path / "prog",
                                           base_quant="none", dtype="fp32", training=TrainConfig(**training)),
                         sample_path("dates"), tmp_path / "et", say=print)
    laptop = personalize(PersonalizeConfig(lora=lora, seq_len=DEFAULT_SEQ, training=TrainConfig(**training)),
                         sample_path("dates"), tmp_path / "pt", say=print)  # the laptop default: int8 base, bf16
    before, after = exact_match(None), exact_match(tmp_path / "et")
    print(f"dates, {DEFAULT_STEPS} steps of {DEFAULT_BATCH} x {DEFAULT_SEQ}: val loss {device['val_loss_before']:.3f} -> "
          f"executorch {device['val_loss']:.3f} ({device['seconds']:.0f} s), laptop {laptop['val_loss']:.3f} "
          f"({laptop['seconds']:.0f} s); exact match on {TEST_EXAMPLES} test examples {before:.2f} -> {after:.2f}")
    assert abs(device["val_loss"] - laptop["val_loss"]) <= 0.10 * laptop["val_loss"]
    assert device["val_loss"] < 0.7 * device["val_loss_before"]
    assert after >= before + 0.2
