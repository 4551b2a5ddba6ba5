"""Adapters on disk (PEFT format both ways), blending, strength, merge/unmerge, inspect."""

import json
import shutil

import pytest
import torch

from ondevice_lora.adapter import (
    adapter_from_model, attach_adapter, blend, check_base, load_adapter, merge_adapter, save_adapter,
)
from ondevice_lora.adapter_stats import effective_rank, inspect_adapter, singular_values
from ondevice_lora.base import load_base
from ondevice_lora.errors import OdloraError
from ondevice_lora.config import LoraConfig
from ondevice_lora.lora import apply_lora
from conftest import run_cli


def random_adapter(model_dir, seed=0, **lora):
    """An adapter with non-zero A and B on the tiny model (as if trained)."""
    torch.manual_seed(seed)
    base = load_base(str(model_dir))
    config = LoraConfig(**{"rank": 4, "alpha": 8.0, **lora})
    apply_lora(base.model, config)
    for name, p in base.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return adapter_from_model(base.model, config, {"base_fingerprint": base.fingerprint, "base": str(model_dir)})


def logits_with(model_dir, adapter, tokens):
    base = load_base(str(model_dir))
    if adapter is not None:
        attach_adapter(base.model, adapter)
    with torch.no_grad():
        return base.model(tokens)


def transformers_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


TOKENS = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"targets": ("q_proj", "v_proj"), "rank": 2}])
def test_peft_loads_our_adapter(tiny_model_dir, tmp_path, lora):
    from peft import PeftModel

    adapter = random_adapter(tiny_model_dir, **lora)
    save_adapter(adapter, tmp_path / "ad", "tiny")
    peft_model = PeftModel.from_pretrained(transformers_model(tiny_model_dir), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    assert (theirs - logits_with(tiny_model_dir, adapter, TOKENS)).abs().max() <= 1e-4


@pytest.mark.parametrize("peft_kwargs", [
    {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    {"r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"], "alpha_pattern": {"down_proj": 32}},
])
def test_we_load_adapters_that_peft_trained(tiny_llama_dir, tmp_path, peft_kwargs):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(transformers_model(tiny_llama_dir), PeftLoraConfig(**peft_kwargs))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model.eval()(TOKENS).logits
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.fingerprint is None  # PEFT writes no odlora.json
    assert (logits_with(tiny_llama_dir, adapter, TOKENS) - theirs).abs().max() <= 1e-4


def test_merge_equals_attached_and_unmerge_restores(tiny_llama_dir):
    adapter = random_adapter(tiny_llama_dir)
    base = load_base(str(tiny_llama_dir))
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    merge_adapter(base.model, adapter)
    with torch.no_grad():
        merged = base.model(TOKENS)
    assert (merged - logits_with(tiny_llama_dir, adapter, TOKENS)).abs().max() <= 1e-4
    merge_adapter(base.model, adapter, sign=-1.0)
    assert max((base.model.state_dict()[k] - v).abs().max().item() for k, v in original.items()) <= 1e-5


def test_blend_is_the_weighted_sum_of_updates(tiny_llama_dir):
    a, b = random_adapter(tiny_llama_dir, seed=1), random_adapter(tiny_llama_dir, seed=2, rank=2)
    mixed = blend([(a, 0.5), (b, 2.0)])
    name = next(iter(a.A))
    torch.testing.assert_close(mixed.delta(name), 0.5 * a.delta(name) + 2.0 * b.delta(name))
    assert mixed.A[name].shape[0] == 6  # ranks stack


def test_strength_zero_is_the_base_and_one_is_the_adapter(tiny_llama_dir):
    adapter = random_adapter(tiny_llama_dir)
    base_logits = logits_with(tiny_llama_dir, None, TOKENS)
    assert (logits_with(tiny_llama_dir, blend([(adapter, 0.0)]), TOKENS) - base_logits).abs().max() == 0
    full = logits_with(tiny_llama_dir, adapter, TOKENS)
    assert (logits_with(tiny_llama_dir, blend([(adapter, 1.0)]), TOKENS) - full).abs().max() <= 1e-5


def test_adapter_for_another_base_is_refused(tiny_model_factory):
    adapter = random_adapter(tiny_model_factory("llama"))
    other = load_base(str(tiny_model_factory("qwen2")))
    with pytest.raises(OdloraError, match="different base"):
        check_base(adapter, other.fingerprint, "ad")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 40), "corrupt safetensors"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda d: (d / "adapter_config.json").write_text("{"), "invalid JSON"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True})), "use_dora"),
])
def test_damaged_adapters_are_refused(tiny_llama_dir, tmp_path, damage, message):
    save_adapter(random_adapter(tiny_llama_dir), tmp_path / "ad", "tiny")
    damage(tmp_path / "ad")
    with pytest.raises(OdloraError, match=message):
        load_adapter(tmp_path / "ad")


def test_singular_values_match_a_dense_svd(tiny_llama_dir):
    adapter = random_adapter(tiny_llama_dir)
    name = next(iter(adapter.A))
    dense = torch.linalg.svdvals(adapter.delta(name).double())[: adapter.A[name].shape[0]].float()
    torch.testing.assert_close(singular_values(adapter, name), dense, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sv, expected", [([3.0, 0.0, 0.0], 1), ([1.0, 1.0, 1.0, 1.0], 4), ([0.0, 0.0], 0)])
def test_effective_rank(sv, expected):
    assert effective_rank(torch.tensor(sv)) == expected


def test_inspect_reports_every_module(tiny_llama_dir, tmp_path):
    save_adapter(random_adapter(tiny_llama_dir), tmp_path / "ad", "tiny")
    info = inspect_adapter(load_adapter(tmp_path / "ad"), tmp_path / "ad")
    assert info["modules"] == 14 and info["rank"] == 4 and info["size_bytes"] > 0
    assert all(1 <= m["effective_rank_90"] <= 4 for m in info["per_module"].values())



def test_cli_merge_writes_a_checkpoint_transformers_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    adapter = random_adapter(tiny_llama_dir)
    save_adapter(adapter, tmp_path / "ad", "tiny")
    code, _, _ = run_cli(monkeypatch, capsys, "merge", "--base", tiny_llama_dir, "--adapter", tmp_path / "ad",
                      "--out", tmp_path / "merged")
    assert code == 0
    with torch.no_grad():
        merged = transformers_model(tmp_path / "merged")(TOKENS).logits
    assert (merged - logits_with(tiny_llama_dir, adapter, TOKENS)).abs().max() <= 1e-4
    code, out, err = run_cli(monkeypatch, capsys, "merge", "--base", tiny_llama_dir, "--adapter", tmp_path / "ad",
                        "--out", tmp_path / "merged")
    assert code == 2 and "already exists" in err


def test_cli_merge_dtype_and_generation_config(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    adapter = random_adapter(tiny_llama_dir)
    save_adapter(adapter, tmp_path / "ad", "tiny")
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", tiny_llama_dir, "--adapter", tmp_path / "ad",
                           "--out", tmp_path / "merged", "--dtype", "bf16")
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert config["dtype"] == "bfloat16" and generation["eos_token_id"] == load_base(str(tiny_llama_dir)).tokenizer.eos_token_id
    with torch.no_grad():
        merged = transformers_model(tmp_path / "merged")(TOKENS).logits.float()
    assert (merged - logits_with(tiny_llama_dir, adapter, TOKENS)).abs().max() <= 0.1  # bf16 weights


def test_cli_generate_with_adapter_and_strength(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    save_adapter(random_adapter(tiny_llama_dir), tmp_path / "ad", "tiny")
    outputs = []
    for spec in (None, f"{tmp_path / 'ad'}:0", f"{tmp_path / 'ad'}:1.5"):
        extra = ["--adapter", spec] if spec else []
        code, out, err = run_cli(monkeypatch, capsys, "generate", "--base", tiny_llama_dir, "--prompt", "hello",
                            "--max-new-tokens", 8, *extra)
        assert code == 0
        outputs.append(out)
    assert outputs[0] == outputs[1]  # strength 0 is the base
    assert outputs[2] != outputs[0]


def test_cli_inspect_json(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    save_adapter(random_adapter(tiny_llama_dir), tmp_path / "ad", "tiny")
    code, out, err = run_cli(monkeypatch, capsys, "adapter", "inspect", tmp_path / "ad", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["parameters"] > 0


def test_cli_inspect_is_a_readable_table(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    adapter = random_adapter(tiny_llama_dir)
    adapter.meta["metrics"] = {"val_loss": 1.234567890123, "steps": 12}
    save_adapter(adapter, tmp_path / "ad", "tiny")
    code, out, _ = run_cli(monkeypatch, capsys, "adapter", "inspect", tmp_path / "ad")
    assert code == 0 and "{" not in out and "1.235" in out and "1.2345678" not in out
    module_rows = [line.split() for line in out.splitlines() if line.strip().startswith("model.layers.")]
    assert len(module_rows) == len(adapter.A) and all(len(row) == 4 for row in module_rows)


def test_save_replaces_only_when_complete(tiny_llama_dir, tmp_path, monkeypatch):
    good = random_adapter(tiny_llama_dir, seed=1)
    save_adapter(good, tmp_path / "ad", "tiny")
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ondevice_lora.adapter.save_file", broken_write)
    with pytest.raises(OSError):
        save_adapter(random_adapter(tiny_llama_dir, seed=2), tmp_path / "ad", "tiny")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp directory left behind
    shutil.rmtree(tmp_path / "ad")
