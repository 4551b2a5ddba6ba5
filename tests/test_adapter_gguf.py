"""llama.cpp LoRA GGUF export of our adapters (`ondevice_lora.adapter_gguf`), on tiny models.

The oracle for the layout is our own GGUF reader: un-permuting the exported q/k factors the
way `gguf_checkpoint` un-permutes a llama.cpp base must give back the adapter's ΔW exactly.
When llama-cpp-python is installed (not a dependency: see bench/bench_llamacpp.py), llama.cpp
itself runs the tiny F32 GGUF with the exported adapter and must match our model's logits.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ondevice_lora.adapter import Adapter, adapter_from_model, attach_adapter
from ondevice_lora.adapter_gguf import gguf_tensor_name, write_lora_gguf
from ondevice_lora.base import load_base
from ondevice_lora.errors import OdloraError
from ondevice_lora.gguf_checkpoint import _unpermute_qk
from ondevice_lora.config import LoraConfig
from ondevice_lora.lora import apply_lora, lora_layers


def random_adapter(base_spec: str, rank: int = 4, use_rslora: bool = False, seed: int = 0) -> Adapter:
    """A random all-linear adapter with B drawn away from zero (so ΔW is not zero)."""
    base = load_base(base_spec)
    config = LoraConfig(rank=rank, alpha=2.0 * rank, use_rslora=use_rslora)
    torch.manual_seed(seed)
    apply_lora(base.model, config)
    with torch.no_grad():
        for layer in lora_layers(base.model).values():
            layer.lora_B.weight.normal_(0.0, 0.3)
    return adapter_from_model(base.model, config, {"base_fingerprint": base.fingerprint})


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_exported_factors_give_our_delta_in_llama_cpp_layout(tiny_model_factory, tmp_path, variant, use_rslora):
    base_dir = tiny_model_factory(variant)
    base = load_base(str(base_dir))
    adapter = random_adapter(str(base_dir), use_rslora=use_rslora)
    info = write_lora_gguf(adapter, base.config, tmp_path / "a.gguf")

    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert field(reader, "general.architecture") == variant
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    alpha = field(reader, "adapter.lora.alpha")
    # plain LoRA keeps PEFT's alpha and B; rsLoRA's scale alpha/sqrt(r) is folded into B (alpha 0)
    assert (alpha, info["folded"]) == ((0.0, True) if use_rslora else (adapter.config.alpha, False))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == info["tensors"] == 2 * len(adapter.A)
    for module, A in adapter.A.items():
        a, b = tensors[gguf_tensor_name(module) + ".lora_a"], tensors[gguf_tensor_name(module) + ".lora_b"]
        r, out_features = A.shape[0], adapter.B[module].shape[0]
        assert list(a.shape) == [A.shape[1], r] and list(b.shape) == [r, out_features]  # GGUF: innermost first
        scale = alpha / r if alpha else 1.0  # what llama.cpp multiplies by
        delta = scale * (np.asarray(b.data).reshape(out_features, r) @ np.asarray(a.data).reshape(r, A.shape[1]))
        kind = module.rsplit(".", 1)[1]
        if variant == "llama" and kind in ("q_proj", "k_proj"):
            heads = base.config["num_attention_heads" if kind == "q_proj" else "num_key_value_heads"]
            delta = _unpermute_qk(delta, heads)
        assert np.abs(delta - adapter.delta(module).numpy()).max() <= 1e-5, module


def test_names_follow_llama_cpp():
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q.weight"
    assert gguf_tensor_name("model.layers.11.self_attn.o_proj") == "blk.11.attn_output.weight"
    assert gguf_tensor_name("model.layers.2.mlp.down_proj") == "blk.2.ffn_down.weight"
    with pytest.raises(OdloraError, match="decoder layers"):
        gguf_tensor_name("lm_head")


def test_unsupported_architecture_is_refused(tiny_model_factory, tmp_path):
    adapter = random_adapter(str(tiny_model_factory("llama")))
    with pytest.raises(OdloraError, match="unsupported architecture"):
        write_lora_gguf(adapter, {"model_type": "gpt2", "num_attention_heads": 4}, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


@torch.no_grad()
def test_llama_cpp_runs_the_exported_adapter_like_our_model(tiny_gguf_factory, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf_path = tiny_gguf_factory("llama")  # all F32: llama.cpp and we compute the same function
    base = load_base(str(gguf_path))
    adapter = random_adapter(str(gguf_path))
    write_lora_gguf(adapter, base.config, tmp_path / "a.gguf")
    tokens = torch.randint(3, 400, (12,), generator=torch.Generator().manual_seed(0)).tolist()

    def llama_cpp_logits(**lora) -> torch.Tensor:
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **lora)  # not f16
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))

    plain = llama_cpp_logits()
    adapted = llama_cpp_logits(lora_path=str(tmp_path / "a.gguf"))
    ours_plain = base.model(torch.tensor([tokens]))[0]
    attach_adapter(base.model, adapter)
    ours_adapted = base.model(torch.tensor([tokens]))[0]
    assert (ours_adapted - ours_plain).abs().max() > 0.1  # the adapter matters
    assert (plain - ours_plain).abs().max() <= 1e-4  # measured 5e-6
    assert (adapted - ours_adapted).abs().max() <= 1e-4
