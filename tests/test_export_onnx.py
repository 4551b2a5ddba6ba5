"""The ONNX Runtime target: export, parity with our PyTorch model, adapters as slot inputs from packed `.onnx_adapter` blobs.

    python -m pytest -q tests/test_export_onnx.py -m "not slow"        # tiny models, about a minute
    ODLORA_HOME=/tmp/oh python -m pytest -q tests/test_export_onnx.py   # + the real default base

The tiny exports are built once per module (each takes seconds) and shared by the tests.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.adapter import adapter_from_model, attach_adapter, save_adapter  # noqa: E402
from ondevice_lora.base import load_base  # noqa: E402
from ondevice_lora.errors import OdloraError  # noqa: E402
from ondevice_lora.exporters.export import export, pack  # noqa: E402
from ondevice_lora.exporters.onnx import replace_kv_cache_with_io  # noqa: E402
from ondevice_lora.runtime.onnx import OnnxSession  # noqa: E402
from sessions import as_packed, onnx_greedy  # noqa: E402
from ondevice_lora.exporters.onnx_quant import BLOCK_SIZES  # noqa: E402
from ondevice_lora.formats.slots import SlotSpec  # noqa: E402
from ondevice_lora.config import LoraConfig  # noqa: E402
from ondevice_lora.lora import apply_lora  # noqa: E402
from conftest import DEFAULT_EXPORT_QUESTION as QUESTION, DEFAULT_EXPORT_SEQ  # noqa: E402

MAX_SEQ = 64
PROMPT = [1, 45, 203, 17, 99, 250, 3, 12, 88]
DECODE = [7, 140, 33, 260]


def quiet(*_):
    pass


def random_adapter(model_dir, out, seed, fingerprint=None, **lora):
    """A saved adapter with random non-zero A and B (as if trained); returns its directory."""
    torch.manual_seed(seed)
    base = load_base(str(model_dir))
    config = LoraConfig(**{"rank": 4, "alpha": 8.0, **lora})
    apply_lora(base.model, config)
    for name, p in base.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    meta = {"base_fingerprint": fingerprint or base.fingerprint}
    save_adapter(adapter_from_model(base.model, config, meta), out, "tiny")
    return out


@pytest.fixture(scope="module")
def exports(tiny_model_factory, tmp_path_factory):
    """Tiny exports built once: fp32 all-linear r<=8, int8 with q/v slots only, int4 all-linear."""
    root = tmp_path_factory.mktemp("onnx-exports")
    model_dir = tiny_model_factory("llama")
    torch.set_num_threads(1)
    built = {
        "fp32": export(str(model_dir), "onnx", root / "fp32", max_rank=8, max_seq_len=MAX_SEQ, say=quiet),
        "int8-qv": export(str(model_dir), "onnx", root / "int8-qv", quant="int8", max_rank=4,
                          targets=("q_proj", "v_proj"), max_seq_len=MAX_SEQ, say=quiet),
        "int4": export(str(model_dir), "onnx", root / "int4", quant="int4", max_rank=8, max_seq_len=MAX_SEQ, say=quiet),
    }
    return {"model_dir": model_dir, "root": root, "manifests": built, **{k: root / k for k in built}}


@pytest.fixture(scope="module")
def adapters(exports, tmp_path_factory):
    """Two random rank-4 all-linear adapters, as directories and packed for the fp32 export."""
    root = tmp_path_factory.mktemp("onnx-adapters")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        directory = random_adapter(exports["model_dir"], root / name, seed)
        pack(directory, exports["fp32"], root / f"{name}.onnx_adapter")
        out[name] = (directory, root / f"{name}.onnx_adapter")
    return out


def torch_logits(model_dir, adapter_dir, steps):
    """Our PyTorch model with its in-place KV cache: logits for each (tokens, positions) step; the
    adapter's factors rounded as a packed blob stores them (so 1e-3 tests the graph, not fp16)."""
    from ondevice_lora.adapter import load_adapter

    model = load_base(str(model_dir)).model
    if adapter_dir is not None:
        attach_adapter(model, as_packed(load_adapter(adapter_dir)))
    model.setup_cache(1, MAX_SEQ)
    with torch.no_grad():
        return [model(torch.tensor([t]), input_pos=torch.tensor(p)).numpy() for t, p in steps]


def onnx_logits(session, adapter, steps):
    caches, out = session.new_cache(), []
    for tokens, positions in steps:
        logits, caches = session.forward([tokens], positions, caches, adapter)
        out.append(logits)
    return out


def steps_for(prompt=PROMPT, decode=DECODE):
    """Prefill the prompt in one call, then one token per call."""
    steps = [(prompt, list(range(len(prompt))))]
    return steps + [([t], [len(prompt) + i]) for i, t in enumerate(decode)]


def max_diff(xs, ys):
    return max(float(np.abs(x - y).max()) for x, y in zip(xs, ys))


# -- graph rewrites ------------------------------------------------------------------------------

def test_attention_is_one_node_per_layer_without_a_cache_copy(exports):
    """Per layer: one GroupQueryAttention reading q|k|v packed, each RMSNorm one node with the
    residual Add before it folded in; no cache copy, no attention of its own."""
    import onnx

    model = onnx.load(str(exports["fp32"] / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    n_layers = load_base(str(exports["model_dir"])).model.args.n_layers
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == n_layers and all(list(n.input[1:3]) == ["", ""] for n in attention)  # packed q|k|v
    # The first norm reads the embedding; every other one also adds the residual before it.
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    assert "Pow" not in ops and not {"ScatterElements", "ScatterND", "Softmax"} & set(ops)
    assert json.loads((exports["fp32"] / "manifest.json").read_text())["onnx"]["cache_layout"]["in_place"] is True


def test_each_group_is_one_linear_with_one_slot_path(exports):
    """Per layer and group (q|k|v, o, gate|up, down): the weight term, the block-minimum term and the
    slot path (x @ AT) @ BT summed in one node; the slot inputs' rank is a dimension of their own."""
    import onnx

    model = onnx.load(str(exports["int4"] / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    groups = 4 * 2  # 2 layers
    # Per group: the weights and their block offsets (8-bit); + the LM head, which has no offsets.
    assert ops.count("MatMulNBits") == 2 * groups + 1 and ops.count("Sum") == groups
    # Per group: the block sums, x @ AT, then @ BT.
    assert ops.count("MatMul") == 3 * groups and ops.count("Add") <= 1  # the Add left computes a position
    info = json.loads((exports["int4"] / "manifest.json").read_text())["onnx"]
    shapes = {i["name"]: i["shape"] for i in info["inputs"]}
    assert shapes["lora_AT_qkv.0"] == [64, "rank_qkv"] and shapes["lora_BT_qkv.1"] == ["rank_qkv", 64 + 32 + 32]
    assert shapes["lora_AT_down.1"] == [128, "rank_down"]
    assert info["slot_feed"]["qkv"] == {"width": 128, "columns": {"q_proj": 0, "k_proj": 64, "v_proj": 96}}
    defaults = {i.name: list(i.dims) for i in model.graph.initializer if i.name.startswith("lora_")}
    assert defaults["lora_AT_qkv.0"] == [64, 0] and defaults["lora_BT_gate_up.1"] == [0, 256]  # rank 0: the base


@pytest.mark.parametrize("in_place", [True, False], ids=["one buffer", "present fed back"])
def test_group_query_attention_node_matches_its_reference(tmp_path, in_place):
    """ONNX Runtime's kernel against the op's eager body (llama.py's RoPE and attention), over a
    prefill and decode steps: with past and present in one buffer, and with present fed back."""
    import onnxruntime as ort

    from ondevice_lora.exporters.onnx import OPSET
    from ondevice_lora.exporters.onnx_attention import translations

    heads, kv_heads, hd, positions = 4, 2, 16, 32
    angles = torch.arange(positions)[:, None].float() * (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, input_pos, past_k, past_v):
            return torch.ops.odlora.group_query_attention(q, k, v, past_k, past_v, input_pos, angles.cos(),
                                                          angles.sin(), heads, kv_heads)

    T = torch.export.Dim("T", min=1, max=positions)
    cache = torch.zeros(1, kv_heads, positions, hd)
    example = (torch.randn(1, 3, heads * hd), torch.randn(1, 3, kv_heads * hd), torch.randn(1, 3, kv_heads * hd),
               torch.arange(3), cache, cache.clone())  # two tensors: torch.export would make one input of one
    program = torch.export.export(Layer(), example, dynamic_shapes=({1: T}, {1: T}, {1: T}, {0: T}, None, None))
    torch.onnx.export(program, (), dynamo=True, input_names=["q", "k", "v", "input_pos", "past_k", "past_v"],
                      output_names=["y", "present_k", "present_v"], custom_translation_table=translations(),
                      opset_version=OPSET, verbose=False).save(str(tmp_path / "gqa.onnx"))
    session = ort.InferenceSession(str(tmp_path / "gqa.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, heads * hd), torch.randn(1, 9, kv_heads * hd), torch.randn(1, 9, kv_heads * hd)
    expected_k = expected_v = cache
    # Rows not yet written hold NaN: the kernel must read only what it wrote (the runtime leaves them unset).
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.full(cache.shape, np.nan, np.float32)) for _ in range(2)]
    for start, end in [(0, 5), (5, 6), (6, 7), (7, 9)]:
        pos = torch.arange(start, end)
        args = (q[:, start:end], k[:, start:end], v[:, start:end], pos)
        expected, expected_k, expected_v = torch.ops.odlora.group_query_attention(
            *args[:3], expected_k, expected_v, pos, angles.cos(), angles.sin(), heads, kv_heads)
        binding = session.io_binding()
        for name, value in zip(["q", "k", "v", "input_pos"], args):
            binding.bind_cpu_input(name, value.numpy())
        for name, buffer in zip(["past_k", "past_v"], buffers):
            binding.bind_ortvalue_input(name, buffer)
        binding.bind_output("y")
        for name, buffer in zip(["present_k", "present_v"], buffers):
            binding.bind_ortvalue_output(name, buffer) if in_place else binding.bind_output(name)
        session.run_with_iobinding(binding)
        y, *present = binding.get_outputs()
        if not in_place:
            buffers = present
        assert np.abs(y.numpy() - expected.numpy()).max() < 1e-5
        assert np.abs(buffers[0].numpy()[:, :, :end] - expected_k.numpy()[:, :, :end]).max() < 1e-6


def test_replace_kv_cache_with_io_is_functional(exports):
    model = load_base(str(exports["model_dir"])).model
    model.setup_cache(1, MAX_SEQ)
    caches = replace_kv_cache_with_io(model)
    assert len(caches) == model.args.n_layers
    assert all(layer.self_attn.kv_cache is c for layer, c in zip(model.model.layers, caches))
    assert not any("kv_cache" in name for name, _ in model.named_buffers())  # the in-place buffers are gone


# -- fp32 parity --------------------------------------------------------------------------------

def test_fp32_matches_pytorch_base_and_adapter(exports, adapters):
    """Prefill + decode steps: zero slots (no adapter active) and a packed adapter, both <= 1e-3."""
    session = OnnxSession(exports["fp32"], threads=1)
    steps = steps_for()
    base = max_diff(onnx_logits(session, None, steps), torch_logits(exports["model_dir"], None, steps))
    assert base <= 1e-3
    directory, packed = adapters["a"]
    adapted_onnx = onnx_logits(session, session.load_adapter(packed), steps)
    adapted_torch = torch_logits(exports["model_dir"], directory, steps)
    assert max_diff(adapted_onnx, adapted_torch) <= 1e-3
    # The adapter changes the answer by far more than the tolerance: the test can tell them apart.
    assert max_diff(adapted_onnx, onnx_logits(session, None, steps)) > 0.1


def test_adapters_switch_per_call_on_one_session(exports, adapters):
    session = OnnxSession(exports["fp32"], threads=1)
    steps = steps_for(decode=DECODE[:2])
    loaded = {name: session.load_adapter(packed) for name, (_, packed) in adapters.items()}
    expected = {name: torch_logits(exports["model_dir"], directory, steps) for name, (directory, _) in adapters.items()}
    expected[None] = torch_logits(exports["model_dir"], None, steps)
    for name in ("a", None, "b", "a", None):
        got = onnx_logits(session, loaded.get(name), steps)
        assert max_diff(got, expected[name]) <= 1e-3, f"adapter {name} after a switch"


def test_greedy_matches_pytorch(exports, adapters):
    session = OnnxSession(exports["fp32"], threads=1)
    model = load_base(str(exports["model_dir"])).model
    model.setup_cache(1, MAX_SEQ)
    ids, pos = list(PROMPT), 0
    with torch.no_grad():
        while len(ids) < len(PROMPT) + 8:
            logits = model(torch.tensor([ids[pos:]]), input_pos=torch.arange(pos, len(ids)))
            pos = len(ids)
            ids.append(int(logits[0, -1].argmax()))
    assert onnx_greedy(session, PROMPT, 8) == ids[len(PROMPT):]
    with pytest.raises(OdloraError, match="max-seq-len"):
        onnx_greedy(session, PROMPT, MAX_SEQ)


# -- quantised exports --------------------------------------------------------------------------

# Relative L2 error of the logits vs fp32 PyTorch on the tiny random model (measured 0.068 / 0.42:
# int8 activations inside MatMulNBits and an int8 embedding; random weights have no structure for
# 4 bits to keep). Real quality is the slow test's business.
@pytest.mark.parametrize("name,max_rel_error", [("int8-qv", 0.1), ("int4", 0.6)])
def test_quantised_exports_run_close_and_smaller(exports, name, max_rel_error):
    manifest = exports["manifests"][name]
    q = manifest["onnx"]["quantization"]
    assert q["block_size"] == BLOCK_SIZES[manifest["quant"]] and q["kept_fp32"] == 0
    # Per layer q|k|v and gate|up (one MatMul each: they share an input), o and down; the LM head; never a slot.
    assert q["MatMulNBits"] == 2 * 4 + 1
    assert q["GatherBlockQuantized"] == 1  # the embedding
    size = lambda m: m["files"]["model.onnx.data"]["size"]  # noqa: E731
    assert size(manifest) < 0.6 * size(exports["manifests"]["fp32"])
    steps = steps_for()
    got = np.concatenate([x.ravel() for x in onnx_logits(OnnxSession(exports[name], threads=1), None, steps)])
    reference = np.concatenate([x.ravel() for x in torch_logits(exports["model_dir"], None, steps)])
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < max_rel_error


def q4_1_grid_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A (K, N) weight as a Q4_1 GGUF holds it: per 32 inputs of a column, w = d q + m, q in 0..15 (both ends used)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.01, (n, k // 32, 1)).astype(np.float32)
    m = rng.uniform(-0.08, 0.0, (n, k // 32, 1)).astype(np.float32)
    return (d * q + m).astype(np.float32).reshape(n, k).T.copy()


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantisation_is_exact_on_a_q4_1_grid(bits):
    from ondevice_lora.exporters.onnx_quant import block_quantize

    weight = q4_1_grid_weight(64, 24)
    packed, step, low = block_quantize(weight, bits, 32)
    q = packed.astype(np.int32)
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(24, 2, 32)
    restored = (q * step.reshape(24, 2, 1) + low.T[..., None]).reshape(24, 64).T
    assert np.abs(restored - weight).max() <= 1e-6


@pytest.mark.parametrize("bits,level,max_rel_error", [(4, 0, 3e-3), (8, 0, 3e-3), (4, 4, 0.03), (8, 4, 0.03)])
def test_quantised_matmul_runs_in_onnxruntime(bits, level, max_rel_error, monkeypatch):
    """One MatMul through the rewrite: with fp32 activations (level 0) only the 8-bit rounding of
    the block offsets is left (measured 1.0e-3 / 1.2e-3 relative; the weights' own grid is exact, see
    the test above); level 4 adds int8 activation rounding (~2%)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ondevice_lora.exporters import onnx_quant

    monkeypatch.setattr(onnx_quant, "ACCURACY_LEVEL", level)
    weight = q4_1_grid_weight(64, 96, seed=1)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 96])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx_quant.GraphQuantizer(model, bits, 32).run(None)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "MatMul", "MatMulNBits", "Add"]
    x = np.random.default_rng(2).standard_normal((1, 3, 64)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ weight
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= max_rel_error


def test_adapter_on_quantised_export(exports, tmp_path):
    """int8 base weights + fp32 slots: the adapter's effect matches PyTorch's on the same quantised base."""
    directory = random_adapter(exports["model_dir"], tmp_path / "qv", 3, targets=("q_proj", "v_proj"))
    pack(directory, exports["int8-qv"], tmp_path / "qv.onnx_adapter")
    session = OnnxSession(exports["int8-qv"], threads=1)
    steps = steps_for()
    delta_onnx = [a - b for a, b in zip(onnx_logits(session, session.load_adapter(tmp_path / "qv.onnx_adapter"), steps),
                                        onnx_logits(session, None, steps))]
    reference = torch_logits(exports["model_dir"], directory, steps)
    delta_torch = [a - b for a, b in zip(reference, torch_logits(exports["model_dir"], None, steps))]
    assert max_diff(delta_onnx, delta_torch) < 0.1 * max(float(np.abs(d).max()) for d in delta_torch)


# -- pack -----------------------------------------------------------------------------------------

def test_pack_writes_an_ort_adapter(exports, adapters):
    import onnxruntime as ort

    _, packed = adapters["a"]
    info = json.loads(packed.with_name(packed.name + ".json").read_text())
    assert info["target"] == "onnx" and info["rank"] == 4 and info["size"] == packed.stat().st_size
    fmt = ort.AdapterFormat.read_adapter(str(packed))
    manifest = exports["manifests"]["fp32"]
    assert fmt.get_model_version() == OnnxSession(exports["fp32"], threads=1).model_version != 0
    assert sorted(fmt.get_parameters()) == sorted(SlotSpec.from_dict(manifest["slots"]).per_layer_names())
    # Stored small (version 2): fp16, at the adapter's rank 4 of the export's 8.
    assert fmt.get_adapter_version() == 2
    spec = SlotSpec.from_dict(manifest["slots"])
    for name, value in fmt.get_parameters().items():
        assert value.numpy().dtype == np.float16 and list(value.shape()) == spec.shape(name.rpartition(".")[0], 4)[1:]


def test_packed_blob_reads_back_as_the_full_rank_slots(exports, adapters, tmp_path):
    """Version 2 (fp16, own rank) pads back to the fp32 slots within fp16 rounding; a version 1 blob
    (fp32, full rank, as earlier odlora wrote) still loads, exactly."""
    import onnxruntime as ort

    from ondevice_lora.adapter import load_adapter
    from ondevice_lora.models.slots import slot_tensors
    from ondevice_lora.runtime.onnx import read_slots

    directory, packed = adapters["a"]
    manifest = exports["manifests"]["fp32"]
    spec = SlotSpec.from_dict(manifest["slots"])
    want = slot_tensors(load_adapter(directory), spec)
    got = read_slots(packed, manifest)
    assert {n: list(t.shape) for n, t in got.items()} == {n: list(t.shape) for n, t in want.items()}
    assert all(torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-6) for n in want)
    old = ort.AdapterFormat()
    old.set_adapter_version(1)
    old.set_model_version(OnnxSession(exports["fp32"], threads=1).model_version)
    old.set_parameters({f"{n}.{i}": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t[i].numpy()))
                        for i in range(spec.n_layers) for n, t in want.items()})
    old.export_adapter(str(tmp_path / "v1.onnx_adapter"))
    assert all(torch.equal(t, want[n]) for n, t in read_slots(tmp_path / "v1.onnx_adapter", manifest).items())


def test_pack_refuses_another_base(exports, tmp_path):
    directory = random_adapter(exports["model_dir"], tmp_path / "ad", 4, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(OdloraError, match="different base"):
        pack(directory, exports["fp32"], tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_pack_refuses_rank_above_slots(exports, tmp_path):
    directory = random_adapter(exports["model_dir"], tmp_path / "ad", 5, rank=16)
    with pytest.raises(OdloraError, match="rank 16 exceeds the export's maximum slot rank 8"):
        pack(directory, exports["fp32"], tmp_path / "x.onnx_adapter")


def test_pack_refuses_targets_outside_slots(exports, tmp_path):
    directory = random_adapter(exports["model_dir"], tmp_path / "ad", 6)  # all-linear, the export has q/v slots
    with pytest.raises(OdloraError, match=r"outside the export's slots \(q_proj, v_proj\)"):
        pack(directory, exports["int8-qv"], tmp_path / "x.onnx_adapter")


def test_pack_refuses_corrupt_adapter(exports, tmp_path):
    directory = random_adapter(exports["model_dir"], tmp_path / "ad", 7)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OdloraError, match="corrupt safetensors"):
        pack(directory, exports["fp32"], tmp_path / "x.onnx_adapter")


def test_session_refuses_foreign_or_damaged_blob(exports, adapters, tmp_path):
    _, packed = adapters["a"]
    session = OnnxSession(exports["int8-qv"], threads=1)  # same base, other slots
    with pytest.raises(OdloraError, match="do not match this export's slots"):
        session.load_adapter(packed)
    damaged = tmp_path / "damaged.onnx_adapter"
    damaged.write_bytes(b"\0" * 64 + packed.read_bytes()[64:200])
    with pytest.raises(OdloraError, match="not a readable ONNX Runtime adapter"):
        OnnxSession(exports["fp32"], threads=1).load_adapter(damaged)


# -- the export directory -------------------------------------------------------------------------

def test_manifest_lists_graph_io_and_files(exports):
    manifest = exports["manifests"]["fp32"]
    info = manifest["onnx"]
    names = [i["name"] for i in info["inputs"]]
    assert names[:4] == ["tokens", "input_pos", "past_key_0", "past_value_0"]
    groups = ("qkv", "o", "gate_up", "down")
    assert names[-16:] == info["slot_inputs"] == [f"lora_{f}_{g}.{layer}" for layer in range(2) for g in groups
                                                  for f in ("AT", "BT")]
    assert info["inputs"][0]["shape"][1] == info["inputs"][1]["shape"][0]  # one dynamic T
    assert isinstance(info["inputs"][1]["shape"][0], str)
    assert [o["name"] for o in info["outputs"]][:2] == ["logits", "present_key_0"]
    assert info["cache_layout"]["shape"] == [1, 2, MAX_SEQ, 16] and info["opset"] >= 18
    on_disk = {str(p.relative_to(exports["fp32"])) for p in exports["fp32"].rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {"model.onnx", "model.onnx.data", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert len(entry["sha256"]) == 64 and entry["size"] == (exports["fp32"] / name).stat().st_size


def test_export_refuses_existing_dir_and_damaged_files(exports, tmp_path):
    with pytest.raises(OdloraError, match="already exists"):
        export(str(exports["model_dir"]), "onnx", exports["fp32"], say=quiet)
    with pytest.raises(OdloraError, match="not supported for onnx"):
        export(str(exports["model_dir"]), "onnx", tmp_path / "new", quant="int2", say=quiet)
    copy = tmp_path / "copy"
    shutil.copytree(exports["int4"], copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(OdloraError, match="does not match its manifest checksum"):
        OnnxSession(copy)


# -- the real default base (slow) ------------------------------------------------------------------

CHUNK = DEFAULT_EXPORT_SEQ

# The base is a Q4_1 GGUF; onnx_quant.py keeps its grid. 8 bits in blocks of 16: perplexity +1.8%
# (blocks of 32: +2.5%); 4 bits in blocks of 32: +1.4% (measured on an AVX-512 machine).


def nll(logits: np.ndarray, ids: list[int]) -> float:
    z = logits[0, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    z -= np.log(np.exp(z).sum(-1, keepdims=True))
    return -float(z[np.arange(len(ids) - 1), ids[1:]].sum())


@pytest.fixture(scope="module")
def default_reference(default_base):
    """Our PyTorch fp32 model (= ONNX fp32 within 1e-3): prompt logits and held-out perplexity."""
    from ondevice_lora.prompts import encode_prompt
    from ondevice_lora.samples import general_text_path

    tokenizer = default_base.tokenizer
    ids = tokenizer.encode(general_text_path().read_text(), add_special_tokens=False)
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids) - 1, CHUNK)]
    prompt = encode_prompt(tokenizer, QUESTION)
    with torch.no_grad():
        logits = default_base.model(torch.tensor([prompt])).numpy()
        total = sum(nll(default_base.model(torch.tensor([c])).numpy(), c) for c in chunks)
    return {"prompt": prompt, "logits": logits, "chunks": chunks,
            "ppl": math.exp(total / sum(len(c) - 1 for c in chunks))}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_default_base(default_base, default_reference, default_adapter, default_export, tmp_path, quant):
    """fp32 parity on a chat prompt, with zero slots and with an adapter; every export keeps the
    greedy answer; quantised perplexity <= +5%."""
    ref = default_reference
    exported = default_export("onnx", quant)
    session = OnnxSession(exported)
    logits, _ = session.forward([ref["prompt"]], range(len(ref["prompt"])), session.new_cache())
    if quant == "fp32":
        adapter_dir, with_adapter = default_adapter
        pack(adapter_dir, exported, tmp_path / "r8.onnx_adapter")
        got, _ = session.forward([ref["prompt"]], range(len(ref["prompt"])), session.new_cache(),
                                 session.load_adapter(tmp_path / "r8.onnx_adapter"))
        assert (tmp_path / "r8.onnx_adapter").stat().st_size <= 5_000_000  # rank 8, all seven linears
        with torch.no_grad():
            want = with_adapter(torch.tensor([ref["prompt"]])).numpy()
        assert np.abs(want - ref["logits"]).max() > 0.1  # the adapter changes the logits
        assert float(np.abs(got - want).max()) <= 1e-3
    answer = default_base.tokenizer.decode(onnx_greedy(session, ref["prompt"], 12))
    total = 0.0
    for chunk in ref["chunks"]:
        total += nll(session.forward([chunk], range(len(chunk)), session.new_cache())[0], chunk)
    ppl = math.exp(total / sum(len(c) - 1 for c in ref["chunks"]))
    diff = float(np.abs(logits - ref["logits"]).max())
    print(f"{quant}: max|diff| {diff:.2e}, perplexity {ppl:.3f} (fp32 {ref['ppl']:.3f}), answer {answer!r}")
    if quant == "fp32":
        assert diff <= 1e-3
    assert ppl <= 1.05 * ref["ppl"], f"{ppl:.2f} vs fp32 {ref['ppl']:.2f}"
    assert "Paris" in answer, answer
