"""The Core ML target: the converted program's interface, quantisation, adapter packing, numerics.

coremltools converts and saves on Linux but cannot predict there, so correctness is shown in
four ways: the package's spec and MIL program are inspected (inputs, states, outputs, ops); the
very ExportedProgram handed to ct.convert is run in torch and compared with the eager model plus
`attach_adapter`; the converted MIL program is executed op by op in numpy (fp16 rounding, states
included) against the same reference; and on macOS, Core ML's own logits are compared.

    python -m pytest -q tests/test_export_coreml.py      # about 30 s on 2 cores: one conversion
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import types  # noqa: E402

from ondevice_lora.adapter import Adapter, attach_adapter, save_adapter  # noqa: E402
from ondevice_lora.base import load_base  # noqa: E402
from ondevice_lora.errors import OdloraError  # noqa: E402
from ondevice_lora.exporters import coreml  # noqa: E402
from ondevice_lora.exporters.export import export, pack  # noqa: E402
from ondevice_lora.formats.blobs import COREML_SLOTS_FORMAT  # noqa: E402
from ondevice_lora.formats.manifest import read_manifest  # noqa: E402
from ondevice_lora.models.slots import slot_tensors, spec_for_model, zero_slots  # noqa: E402
from ondevice_lora.runtime import coreml as coreml_runtime  # noqa: E402
from ondevice_lora.config import LoraConfig  # noqa: E402

MAX_RANK = 8
MAX_SEQ_LEN = 16
TOKENS = [5, 17, 123, 42, 7, 300, 9, 64]


def random_adapter(model, rank: int, seed: int, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                   layers=None, fingerprint=None) -> Adapter:
    """Non-zero A and B (a trained adapter's B is non-zero) on some targets and layers."""
    g = torch.Generator().manual_seed(seed)
    A, B, scalings = {}, {}, {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if short in targets and (layers is None or layer in layers) and hasattr(module, "in_features"):
            A[name] = torch.randn(rank, module.in_features, generator=g) * 0.3
            B[name] = torch.randn(module.out_features, rank, generator=g) * 0.3
            scalings[name] = 2.0 / rank
    config = LoraConfig(rank=rank, alpha=2.0, targets=tuple(sorted(targets)))
    return Adapter(A=A, B=B, scalings=scalings, config=config, meta={"base_fingerprint": fingerprint})


# -- one conversion per module ----------------------------------------------------------------------

MASSIVE = 2000.0  # one residual channel of TOKENS[0]: its square overflows fp16 (max 65504)


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory, tmp_path_factory):
    """The tiny Llama with one "massive activation", as real bases carry (the default base reaches
    about 25000): a plain fp16 RMSNorm turns it into inf, so the numerics below cover that case."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-massive")
    shutil.copytree(tiny_model_factory("llama"), out, dirs_exist_ok=True)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.embed_tokens.weight"][TOKENS[0], 0] = MASSIVE
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def base(base_dir):
    return load_base(str(base_dir))


@pytest.fixture(scope="module")
def spec(base):
    return spec_for_model(base.model, max_rank=MAX_RANK)


@pytest.fixture(scope="module")
def exported(base_dir, tmp_path_factory):
    """The full `odlora export --target coreml` pipeline (fp16), run once; also returns the very
    ExportedProgram that it handed to ct.convert."""
    out = tmp_path_factory.mktemp("coreml") / "export"
    handed = []

    def convert(program, spec):
        handed.append(program)
        return real_convert(program, spec)

    real_convert = coreml.convert
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coreml, "convert", convert)
        manifest = export(str(base_dir), "coreml", out, max_rank=MAX_RANK, max_seq_len=MAX_SEQ_LEN, say=lambda *a: None)
    return out, manifest, handed[0]


@pytest.fixture(scope="module")
def mlmodel(exported):
    out, _, _ = exported
    return ct.models.MLModel(str(out / coreml.PACKAGE), skip_model_load=True)


@pytest.fixture(scope="module")
def program(exported):
    """The ExportedProgram that ct.convert received in the export above."""
    return exported[2]


def ops_of(model) -> list:
    return list(coreml.mil_program(model).functions["main"].operations)


def weight_bin(package) -> bytes:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()


# -- the package's interface --------------------------------------------------------------------------

def test_quants_fp16_first():
    assert coreml.QUANTS[0] == "fp16" and set(coreml.QUANTS) == {"fp16", "int8", "int4"}


def test_inputs_states_outputs(mlmodel, exported, base, spec):
    args = base.model.args
    desc = coreml.describe(mlmodel)
    assert desc["inputs"]["tokens"] == {"shape": [1, 1], "dtype": "int32"}
    assert desc["inputs"]["input_pos"] == {"shape": [1], "dtype": "int32"}
    slot_inputs = {n: v for n, v in desc["inputs"].items() if n.startswith("lora_")}
    assert list(slot_inputs) == list(spec.layout())  # every slot, in the graph's order
    for name, shape in spec.layout().items():
        assert slot_inputs[name] == {"shape": shape, "dtype": "float16"}, name
    assert len(desc["states"]) == 2 * args.n_layers
    for state in desc["states"]:
        assert state["shape"] == [1, args.n_kv_heads, MAX_SEQ_LEN, args.head_dim] and state["dtype"] == "float16"
    assert {s["name"][-7:] for s in desc["states"]} == {"k_cache", "v_cache"}
    assert desc["outputs"] == [{"name": "logits", "shape": [1, 1, args.vocab_size], "dtype": "float16"}]
    assert mlmodel.get_spec().specificationVersion >= 9  # iOS 18 / macOS 15: stateful models

    _, manifest, _ = exported
    fields = manifest["coreml"]
    assert {k: fields[k] for k in desc} == desc
    assert fields["package"] == coreml.PACKAGE and fields["compute_precision"] == "float16"
    assert manifest["quant"] == "fp16" and manifest["slots"]["layout"] == spec.layout()


def test_program_updates_caches_in_place_and_reads_slots_as_inputs(mlmodel, base, spec):
    ops = ops_of(mlmodel)
    kinds = Counter(op.op_type for op in ops)
    n = 2 * base.model.args.n_layers
    assert kinds["read_state"] == n and kinds["coreml_update_state"] == n and kinds["slice_update"] == n
    assert kinds["scaled_dot_product_attention"] == base.model.args.n_layers
    # The slot tensors are never constants: each is a function input read by the graph.
    inputs = coreml.mil_program(mlmodel).functions["main"].inputs
    for name in spec.layout():
        assert name in inputs and inputs[name].child_ops, name
    assert not any(op.op_type == "const" and "lora_" in op.name for op in ops)


@pytest.mark.parametrize("quant, bits", [("int8", 8), ("int4", 4)])
def test_quantized_base_weights(mlmodel, exported, spec, quant, bits, tmp_path):
    quantized = coreml.quantize(mlmodel, quant)
    ops = ops_of(quantized)
    dequant = [op for op in ops if op.op_type in ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize",
                                                  "constexpr_lut_to_dense")]
    n_linear = sum(op.op_type == "linear" for op in ops)
    assert len(dequant) == n_linear + 1  # every linear weight and the token embedding
    fp16 = {op.name: op.outputs[0].val for op in ops_of(mlmodel) if op.op_type == "const"}
    for op in dequant:
        assert op.inputs["data"].dtype.get_bitwidth() == bits, op.name
        scale = np.asarray(op.inputs["scale"].val, np.float32)
        weight = fp16[op.name.removesuffix("_quantized")].astype(np.float32)
        assert scale.shape == (weight.shape[0], 1 if bits == 8 else weight.shape[1] // coreml.INT4_BLOCK_SIZE)
        # each weight lies within half a quantisation step of its fp16 value
        assert np.all(np.abs(dequantize(op) - weight) <= 0.5 * _per_element(scale, weight.shape) + 1e-3), op.name
    assert all("rope" not in op.name and "norm" not in op.name for op in dequant)
    assert coreml.describe(quantized)["inputs"] == coreml.describe(mlmodel)["inputs"]  # slots untouched
    quantized.save(str(tmp_path / "q.mlpackage"))
    fp16_size = len(weight_bin(exported[0] / coreml.PACKAGE))
    size = len(weight_bin(tmp_path / "q.mlpackage"))
    assert size < fp16_size * (0.65 if bits == 8 else 0.45), (size, fp16_size)


# -- numerics: the graph Core ML receives, run in torch -----------------------------------------------

def decode(module, slots) -> torch.Tensor:
    """Feed TOKENS one by one, as the Core ML package is called; logits (1, T, vocab)."""
    out = []
    with torch.no_grad():
        for i, token in enumerate(TOKENS):
            out.append(module(torch.tensor([[token]]), torch.tensor([i]), *slots.values()))
    return torch.cat(out, dim=1)


def reference(base, spec, with_adapter: bool):
    """(slot tensors, eager logits (T, vocab)): the base, or the base + attach_adapter of a rank-4
    adapter (below R, on one layer only) laid into the slots."""
    model = copy.deepcopy(base.model)
    slots = zero_slots(spec)
    if with_adapter:
        adapter = random_adapter(base.model, rank=4, seed=1, layers=(1,))
        slots = slot_tensors(adapter, spec)
        attach_adapter(model, adapter)
    with torch.no_grad():
        return slots, model(torch.tensor([TOKENS]))[0]


@pytest.mark.parametrize("with_adapter", [False, True], ids=["zero-slots", "adapter"])
def test_exported_program_matches_eager_model(program, base, spec, with_adapter):
    slots, expected = reference(base, spec, with_adapter)
    got = decode(program.module(), slots)[0]
    assert (got - expected).abs().max() <= 1e-3
    if with_adapter:  # the adapter moves the logits far beyond the tolerance
        assert (reference(base, spec, False)[1] - expected).abs().max() > 1e-1


def test_exported_program_is_what_convert_takes(program):
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.index_put.default" in ops and "aten.index_copy.default" not in ops
    assert "aten.alias.default" not in ops
    assert set(program.graph_signature.buffers_to_mutate.values()) == {
        f"model.model.layers.{i}.self_attn.kv_cache.{kv}" for i in range(2) for kv in ("k_cache", "v_cache")}


def test_scaled_rms_norm_survives_fp16():
    from ondevice_lora.models.llama import RMSNorm

    norm = RMSNorm(64, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 64)
    x[0, 0], x[2] = MASSIVE * 12, 0.0  # a massive activation as in the default base; an all-zero row
    expected = norm(x)
    assert not torch.isfinite(x.half().pow(2).mean(-1)).all()  # what a plain fp16 RMSNorm computes
    scaled = coreml.ScaledRMSNorm(norm)
    torch.testing.assert_close(scaled(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.half()(x.half()).float(), expected, rtol=1e-2, atol=1e-2)


def test_export_leaves_the_callers_model_alone(base, spec):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    coreml.prepare(base.model, spec, MAX_SEQ_LEN)
    assert base.model.cache_len is None and type(base.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


# -- numerics: the converted program, read op by op in numpy (helpers at the end of the file) ---------

def mil_decode(mlmodel, slots):
    """Feed TOKENS one by one through the package's own program; (logits (T, vocab), final states)."""
    program = coreml.mil_program(mlmodel)
    state = {s["name"]: np.zeros(s["shape"], np.float16) for s in coreml.describe(mlmodel)["states"]}
    feed = {name: t.half().numpy() for name, t in slots.items()}
    logits = [run_mil(program, {"tokens": np.array([[token]], np.int32), "input_pos": np.array([i], np.int32), **feed},
                      state)["logits"][0, 0] for i, token in enumerate(TOKENS)]
    return np.stack(logits).astype(np.float32), state


@pytest.mark.parametrize("with_adapter", [False, True], ids=["zero-slots", "adapter"])
def test_converted_program_read_in_numpy_matches_eager_model(mlmodel, base, spec, with_adapter):
    slots, expected = reference(base, spec, with_adapter)
    got, state = mil_decode(mlmodel, slots)
    assert np.abs(got - expected.numpy()).max() <= 5e-2  # fp16 compute (measured about 0.012)
    for name, cache in state.items():  # one row written per call, at input_pos, and no other
        assert np.all(cache[:, :, len(TOKENS):] == 0) and np.all(np.abs(cache[:, :, :len(TOKENS)]).sum(-1) > 0), name


def test_qwen3_converts_and_reads_like_eager(tiny_model_factory):
    """The family furthest from Llama (per-head q/k RMSNorm, head_dim apart from hidden/heads), fp16.
    Every TINY_VARIANT converts likewise (checked by hand: about 15 s each, too slow for all here)."""
    qwen3 = load_base(str(tiny_model_factory("qwen3")))
    spec = spec_for_model(qwen3.model, max_rank=4)
    mlmodel = coreml.convert(coreml.trace(coreml.prepare(qwen3.model, spec, MAX_SEQ_LEN), spec), spec)
    got, _ = mil_decode(mlmodel, zero_slots(spec))
    with torch.no_grad():
        expected = qwen3.model(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(got - expected).max() <= 5e-2


# -- adapters: packed apart from the base ---------------------------------------------------------------

def test_packing_adapters_never_touches_the_package(exported, base, spec, tmp_path):
    out, manifest, _ = exported
    package = out / coreml.PACKAGE
    before = hashlib.sha256(weight_bin(package)).hexdigest()
    blobs = []
    for seed in (1, 2):
        adapter = random_adapter(base.model, rank=4 + seed, seed=seed, fingerprint=manifest["base_fingerprint"])
        save_adapter(adapter, tmp_path / f"adapter{seed}", "tiny")
        info = pack(tmp_path / f"adapter{seed}", out, tmp_path / f"a{seed}.safetensors")
        assert info["target"] == "coreml" and info["fingerprint_verified"]
        feed = coreml_runtime.read_slots(tmp_path / f"a{seed}.safetensors", manifest)
        expected = slot_tensors(adapter, spec)
        assert set(feed) == set(spec.layout())  # safetensors stores names sorted; the layout keeps the order
        for name, tensor in expected.items():
            assert feed[name].dtype == torch.float16 and list(feed[name].shape) == spec.layout()[name]
            assert torch.equal(feed[name], tensor.half())
        blobs.append((tmp_path / f"a{seed}.safetensors").read_bytes())
    assert blobs[0] != blobs[1]
    assert hashlib.sha256(weight_bin(package)).hexdigest() == before
    read_manifest(out, verify=True)  # every file of the export still matches its checksum

    from safetensors import safe_open

    with safe_open(str(tmp_path / "a1.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["format"] == COREML_SLOTS_FORMAT and meta["dtype"] == "float16" and meta["format_version"] == "2"
    # Stored at the adapter's own rank (5 of the export's R), padded back by the reader.
    assert meta["rank"] == "5" and json.loads(meta["layout"]) == {n: spec.shape(n, 5) for n in spec.layout()}
    assert meta["base_fingerprint"] == manifest["base_fingerprint"]


def test_pack_slots_checks_shapes(exported, spec, tmp_path):
    _, manifest, _ = exported
    slots = zero_slots(spec)
    slots["lora_A_qkv"] = torch.zeros(1, 2, 3)
    with pytest.raises(OdloraError, match="lora_A_qkv has shape"):
        coreml.pack_slots(slots, manifest, tmp_path / "bad.safetensors")
    with pytest.raises(OdloraError, match="not a packed Core ML adapter"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        coreml_runtime.read_slots(tmp_path / "other.safetensors", manifest)


def test_unknown_quant_is_refused(base, spec, tmp_path):
    with pytest.raises(OdloraError, match="not supported for coreml"):
        coreml.export_program(base.model, spec, tmp_path, "int2", MAX_SEQ_LEN)


# -- macOS only: Core ML's own logits -------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions run only on macOS")
@pytest.mark.parametrize("with_adapter", [False, True], ids=["zero-slots", "adapter"])
def test_coreml_predictions_match_pytorch(exported, base, spec, with_adapter):
    out, _, _ = exported
    model = ct.models.MLModel(str(out / coreml.PACKAGE), compute_units=ct.ComputeUnit.CPU_ONLY)
    slots, expected = reference(base, spec, with_adapter)
    feed = {name: t.half().numpy() for name, t in slots.items()}
    state = model.make_state()
    for i, token in enumerate(TOKENS):
        inputs = {"tokens": np.array([[token]], dtype=np.int32), "input_pos": np.array([i], dtype=np.int32), **feed}
        logits = model.predict(inputs, state=state)["logits"]
        assert np.abs(logits[0, 0].astype(np.float32) - expected[i].numpy()).max() <= 5e-2, i


# -- helper: a numpy reading of the MIL ops this program uses ---------------------------------------------
# Core ML cannot run on Linux, but its program can be read: each op below follows the MIL op
# reference (https://apple.github.io/coremltools/source/coremltools.converters.mil.mil.ops.defs.html),
# its result rounded to the op's declared dtype (fp16 here), so an fp16 overflow shows as inf. Sums
# (matmul, linear, reduce_mean, softmax) accumulate in fp32 before that rounding; Core ML's GPU and
# Neural Engine may accumulate in less, which only the macOS test above can see. An op missing
# from this table fails loudly.

NP = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
      "bool": np.bool_}


def _np_dtype(var):
    return types.nptype_from_builtin(var.dtype)


def _per_element(a: np.ndarray, shape) -> np.ndarray:
    """Repeat per-block parameters (a scale per block of rows/columns) up to `shape`."""
    for axis, n in enumerate(shape):
        a = np.repeat(a, n // a.shape[axis], axis=axis)
    return a


def _index(shape, p):
    """slice_by_index / slice_update parameters -> numpy index (squeezed axes take an int)."""
    n = len(shape)
    stride = p.get("stride", [1] * n)
    bm, em, sm = (p.get(k, [False] * n) for k in ("begin_mask", "end_mask", "squeeze_mask"))
    index = []
    for i in range(n):
        b = None if bm[i] else int(p["begin"][i])
        e = None if em[i] else int(p["end"][i])
        index.append(b if sm[i] else slice(b, e, int(stride[i])))
    return tuple(index)


def _sdpa(q, k, v, mask=None):
    scores = q.astype(np.float32) @ np.swapaxes(k, -1, -2).astype(np.float32) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v.astype(np.float32)


OPS = {
    "add": lambda p: p["x"] + p["y"], "mul": lambda p: p["x"] * p["y"], "pow": lambda p: p["x"] ** p["y"],
    "real_div": lambda p: p["x"] / p["y"], "maximum": lambda p: np.maximum(p["x"], p["y"]),
    "abs": lambda p: np.abs(p["x"]),
    "reduce_max": lambda p: p["x"].max(tuple(int(a) for a in p["axes"]), keepdims=bool(p.get("keep_dims", False))),
    "less_equal": lambda p: p["x"] <= p["y"], "greater_equal": lambda p: p["x"] >= p["y"],
    "select": lambda p: np.where(p["cond"], p["a"], p["b"]),
    "cast": lambda p: p["x"].astype(NP[str(p["dtype"])]),
    "inverse": lambda p: 1.0 / (p["x"].astype(np.float32) + p.get("epsilon", 1e-4)),
    "rsqrt": lambda p: 1.0 / np.sqrt(p["x"].astype(np.float32) + p.get("epsilon", 1e-12)),
    "reduce_mean": lambda p: p["x"].astype(np.float32).mean(tuple(int(a) for a in p["axes"]),
                                                            keepdims=bool(p.get("keep_dims", False))),
    "silu": lambda p: p["x"] / (1 + np.exp(-p["x"].astype(np.float32))),
    "matmul": lambda p: np.matmul(np.swapaxes(p["x"], -1, -2) if p.get("transpose_x") else p["x"],
                                  np.swapaxes(p["y"], -1, -2) if p.get("transpose_y") else p["y"]).astype(np.float32),
    "linear": lambda p: p["x"].astype(np.float32) @ p["weight"].T.astype(np.float32) + p.get("bias", 0),
    "reshape": lambda p: p["x"].reshape([int(s) for s in p["shape"]]),
    "transpose": lambda p: np.transpose(p["x"], [int(a) for a in p["perm"]]),
    "expand_dims": lambda p: np.expand_dims(p["x"], tuple(int(a) for a in p["axes"])),
    "squeeze": lambda p: np.squeeze(p["x"], tuple(int(a) for a in p["axes"]) if "axes" in p else None),
    "tile": lambda p: np.tile(p["x"], [int(r) for r in p["reps"]]),
    "concat": lambda p: np.concatenate([np.atleast_1d(v) for v in p["values"]], axis=int(p["axis"])),
    "gather": lambda p: np.take(p["x"], p["indices"].astype(np.int64), axis=int(p["axis"])),
    "slice_by_index": lambda p: p["x"][_index(p["x"].shape, p)],
    "scaled_dot_product_attention": lambda p: _sdpa(p["query"], p["key"], p["value"], p.get("attn_mask")),
}


def dequantize(op) -> np.ndarray:
    """constexpr_blockwise_shift_scale: (data - offset) * scale, each scale covering one block."""
    data = np.asarray(op.inputs["data"].val).astype(np.float32)
    offset = op.inputs.get("offset")
    offset = 0.0 if offset is None else _per_element(np.asarray(offset.val, np.float32), data.shape)
    scale = _per_element(np.asarray(op.inputs["scale"].val, np.float32), data.shape)
    return ((data - offset) * scale).astype(np.float16)


def run_mil(program, inputs: dict, state: dict) -> dict:
    """Execute `program`'s main function in numpy; `state` (name -> array) is read and updated in place."""
    fn = program.functions["main"]
    env = {name: np.asarray(inputs[name]) for name in inputs}

    def value(var):
        return env[var.name] if var.name in env else np.asarray(var.val)

    for op in fn.operations:
        if op.op_type == "const":
            env[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            continue
        if op.op_type == "constexpr_blockwise_shift_scale":
            env[op.outputs[0].name] = dequantize(op)
            continue
        p = {k: [value(x) for x in v] if isinstance(v, (list, tuple)) else value(v) for k, v in op.inputs.items()}
        if op.op_type == "read_state":
            out = state[op.inputs["input"].name].copy()
        elif op.op_type == "coreml_update_state":
            state[op.inputs["state"].name] = out = p["value"].copy()
        elif op.op_type == "slice_update":
            out = p["x"].copy()
            index = _index(out.shape, p)
            out[index] = p["update"].reshape(out[index].shape)
        elif op.op_type == "split":
            cuts = np.cumsum([int(s) for s in p["split_sizes"]])[:-1]
            outs = np.split(p["x"], cuts, axis=int(p["axis"]))
            for var, o in zip(op.outputs, outs):
                env[var.name] = o.astype(_np_dtype(var))
            continue
        else:
            out = OPS[op.op_type](p)
        env[op.outputs[0].name] = np.asarray(out).astype(_np_dtype(op.outputs[0]))
    return {var.name: env[var.name] for var in fn.outputs}
