"""The runtime: one export opened once, adapters swapped per request, on every backend we can run here.

    python -m pytest -q tests/test_runtime.py        # tiny models; the ExecuTorch part lowers once (~30 s)

The oracle is our PyTorch model with the same adapter attached (`attach_adapter` on a fresh
`load_base`, a blend via `ondevice_lora.adapter.blend`), generating greedily with `generate_text`.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.adapter import adapter_from_model, attach_adapter, blend, load_adapter, save_adapter  # noqa: E402
from ondevice_lora.base import load_base  # noqa: E402
from ondevice_lora.errors import OdloraError  # noqa: E402
from ondevice_lora.exporters.export import export, pack  # noqa: E402
from ondevice_lora.config import LoraConfig, SamplingConfig  # noqa: E402
from ondevice_lora.generate import generate_text  # noqa: E402
from ondevice_lora.lora import apply_lora, lora_layers  # noqa: E402
from ondevice_lora.prompts import encode_prompt, stop_token_ids  # noqa: E402
from ondevice_lora.runtime import Runtime  # noqa: E402
from ondevice_lora.runtime.adapters import combine_slots  # noqa: E402
from conftest import run_cli  # noqa: E402

MAX_SEQ = 64
PROMPT = "The cat looks at the river."
GREEDY = SamplingConfig(max_new_tokens=10)
ALL = LoraConfig().targets
# name -> (seed, rank, targets): C's rank does not fit beside A's in the r<=8 slots.
ADAPTERS = {"a": (1, 4, ALL), "b": (2, 2, ("q_proj", "v_proj")), "c": (3, 6, ALL)}
# What requests name, and the blend of adapter directories our PyTorch model gets for each.
CASES = {
    "none": (None, 1.0, []),
    "a": ("a", 1.0, [("a", 1.0)]),
    "b": ("b", 1.0, [("b", 1.0)]),
    "a+b": ([("a", 1.0), ("b", 1.0)], 1.0, [("a", 1.0), ("b", 1.0)]),
    "a@0.5": ("a", 0.5, [("a", 0.5)]),
    "0.7a+0.4b@0.5": ([("b", 0.4), ("a", 0.7)], 0.5, [("a", 0.35), ("b", 0.2)]),
}


def quiet(*_):
    pass


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int, targets) -> Path:
    """A random adapter: PEFT-style init, then B drawn away from zero so that it changes the text."""
    base = load_base(str(base_dir))
    config = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    torch.manual_seed(seed)
    apply_lora(base.model, config)
    with torch.no_grad():
        for layer in lora_layers(base.model).values():
            layer.lora_B.weight.normal_(0.0, 0.3)
    save_adapter(adapter_from_model(base.model, config, {"base_fingerprint": base.fingerprint}), out, "tiny")
    return out


def pytorch_text(base_dir: Path, adapter_dirs, weighted, prompt=PROMPT, cfg=GREEDY) -> str:
    """What our PyTorch model says with `weighted` [(name, weight)] attached (none: the base)."""
    base = load_base(str(base_dir))
    if weighted:
        attach_adapter(base.model, blend([(load_adapter(adapter_dirs[n]), w) for n, w in weighted]))
    ids = encode_prompt(base.tokenizer, prompt)
    return generate_text(base.model, base.tokenizer, ids, cfg, stop_token_ids(base.tokenizer, base.config))


@pytest.fixture(scope="module")
def built(tiny_model_factory, tmp_path_factory):
    """Tiny fp32 ONNX export (r<=8 all-linear), three adapters packed for it, a second export
    with other slots (r<=4 on q/v), and what our PyTorch model answers for each case."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runtime")
    base_dir = tiny_model_factory("llama")
    export(str(base_dir), "onnx", root / "onnx", max_rank=8, max_seq_len=MAX_SEQ, say=quiet)
    export(str(base_dir), "onnx", root / "onnx-qv", max_rank=4, targets=("q_proj", "v_proj"), max_seq_len=MAX_SEQ, say=quiet)
    dirs, blobs = {}, {}
    for name, (seed, rank, targets) in ADAPTERS.items():
        dirs[name] = make_adapter(base_dir, root / f"adapter-{name}", seed, rank, targets)
        blobs[name] = root / f"{name}.onnx_adapter"
        pack(dirs[name], root / "onnx", blobs[name])
    pack(dirs["b"], root / "onnx-qv", root / "b-qv.onnx_adapter")
    expected = {case: pytorch_text(base_dir, dirs, weighted) for case, (_, _, weighted) in CASES.items()}
    assert len(set(expected.values())) == len(expected), "the adapters must change the greedy text"
    return {"root": root, "base_dir": base_dir, "export": root / "onnx", "dirs": dirs, "blobs": blobs, "expected": expected}


def open_runtime(built, backend=None, export_dir=None, **kw) -> Runtime:
    rt = Runtime.open(export_dir or built["export"], backend=backend, **kw)
    for name in ("a", "b", "c"):
        rt.register_adapter(name, built["blobs"][name])
    return rt


@pytest.fixture(scope="module")
def onnx_rt(built):
    return open_runtime(built, threads=1)


def run_case(rt: Runtime, case: str, cfg=GREEDY, prompt=PROMPT) -> str:
    adapter, strength, _ = CASES[case]
    return rt.generate(prompt, adapter=adapter, strength=strength, sampling=cfg).text


# -- parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_onnx_greedy_matches_pytorch(built, onnx_rt, case):
    assert run_case(onnx_rt, case) == built["expected"][case]


def test_torch_reference_backend_matches_pytorch(built):
    rt = open_runtime(built, backend="torch")
    assert rt.backend.name == "torch"
    for case in CASES:
        assert run_case(rt, case) == built["expected"][case], case
    assert rt.backend.serial  # its KV cache is a module buffer: requests take turns
    check_threads(rt, built["expected"], n_threads=8, per_thread=1)


def test_result_fields_messages_and_streaming(built, onnx_rt):
    pieces = []
    result = onnx_rt.generate(PROMPT, adapter="a", sampling=GREEDY, on_text=pieces.append)
    assert "".join(pieces) == result.text == built["expected"]["a"]
    assert result.adapter == "a" and result.finish_reason == "length" and len(result.token_ids) == GREEDY.max_new_tokens
    assert result.prompt_tokens == len(encode_prompt(onnx_rt.tokenizer, PROMPT)) and result.seconds > 0
    as_messages = onnx_rt.generate([{"role": "user", "content": PROMPT}], adapter="a", sampling=GREEDY)
    assert as_messages.text == result.text
    assert onnx_rt.generate(PROMPT, adapter=[("b", 0.4), ("a", 0.7)], strength=0.5, sampling=GREEDY).adapter == "a:0.35+b:0.2"
    assert onnx_rt.generate(PROMPT, adapter="a", strength=0.0, sampling=GREEDY).text == built["expected"]["none"]


def test_stop_strings_and_max_tokens(built, onnx_rt):
    full = built["expected"]["b"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    pieces = []
    result = onnx_rt.generate(PROMPT, adapter="b", sampling=SamplingConfig(max_new_tokens=10, stop=[stop]),
                              on_text=pieces.append)
    assert result.text == full[:full.index(stop)] == "".join(pieces) and result.finish_reason == "stop"
    assert len(onnx_rt.generate(PROMPT, sampling=SamplingConfig(max_new_tokens=3)).token_ids) == 3


def test_seeded_sampling_is_reproducible_and_matches_pytorch(built, onnx_rt):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first = onnx_rt.generate(PROMPT, adapter="a", sampling=cfg).text
    assert onnx_rt.generate(PROMPT, adapter="a", sampling=cfg).text == first
    assert first == pytorch_text(built["base_dir"], built["dirs"], [("a", 1.0)], cfg=cfg)


# -- swapping and the cache --------------------------------------------------------------------------

def test_swapping_never_reloads_the_base(built, monkeypatch):
    import onnxruntime as ort

    sessions = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        sessions.append(real(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(ort, "InferenceSession", counting)
    rt = open_runtime(built, threads=1)
    session = rt.backend.session.session
    for case in ("a", "none", "b", "a", "a+b", "none", "a"):
        assert run_case(rt, case) == built["expected"][case], f"{case} after a swap"
    assert len(sessions) == 1 and rt.backend.session.session is session is sessions[0]
    assert rt.stats()["adapter_loads"] == 4  # a, b, c at registration, then the a+b blend once


def test_lru_evicts_under_a_budget_and_reloads(built):
    probe = open_runtime(built, threads=1)  # a loaded adapter's memory: its slot inputs at its own rank, fp32
    size = {name: probe.backend.load_packed(built["blobs"][name]).nbytes for name in "abc"}
    assert size["b"] < size["a"] < size["c"]  # rank 2 on q and v, rank 4, rank 6 on all seven
    rt = open_runtime(built, threads=1, cache_bytes=size["a"] + size["b"] // 2)  # room for a or b, not both
    # Registered in turn: b evicted a, c evicted b and, larger than the whole budget, was not kept either.
    assert rt.stats()["cache_entries"] == 0 and rt.stats()["evictions"] == 3
    loads = rt.stats()["adapter_loads"]
    for case in ("a", "b", "a", "a"):
        assert run_case(rt, case) == built["expected"][case]
    stats = rt.stats()
    assert stats["adapter_loads"] == loads + 3 and stats["cache_hits"] >= 1  # a, b, a again; the last a is a hit
    assert run_case(rt, "a+b") == built["expected"]["a+b"]  # a blend larger than the budget: built, used, not kept
    assert rt.cache.nbytes <= rt.cache.budget


def test_combine_slots_stacks_ranks(built, onnx_rt):
    spec = onnx_rt.backend.spec
    a, b = (onnx_rt.backend.read_slots(built["blobs"][n]) for n in "ab")
    spec = onnx_rt.backend.spec
    assert spec.used_rank(a, ["qkv"]) == 4 and spec.used_rank(b, ["qkv"]) == 2 and spec.used_rank(b, ["o"]) == 0
    both = combine_slots([("a", a, 1.0), ("b", b, 0.5)], spec)
    x = torch.randn(3, spec.features["q_proj"][0])
    R, q_out = spec.max_rank, spec.features["q_proj"][1]

    def q_delta(slots):  # layer 0's q_proj: (x @ A_qᵀ) @ B_qᵀ
        return x @ slots["lora_A_qkv"][0, :R].T @ slots["lora_B_qkv"][0, :q_out].T

    torch.testing.assert_close(q_delta(both), q_delta(a) + 0.5 * q_delta(b))


# -- concurrency -------------------------------------------------------------------------------------------

def check_threads(rt: Runtime, expected: dict, n_threads: int = 8, per_thread: int = 4):
    """n_threads threads, each running `per_thread` requests with interleaved adapters; every answer
    must equal the single-thread answer of its case."""
    cases = ["none", "a", "b", "a+b"]
    results, errors = [], []
    start = threading.Barrier(n_threads)

    def worker(i):
        try:
            start.wait()
            for j in range(per_thread):
                case = cases[(i + j) % len(cases)]
                results.append((case, run_case(rt, case)))
        except Exception as e:  # reported below, with the thread's case
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads * per_thread
    for case, text in results:
        assert text == expected[case], f"{case} under {n_threads} threads"


def test_onnx_concurrent_requests_never_see_each_others_adapter(built):
    rt = open_runtime(built, threads=1)
    check_threads(rt, built["expected"])


# -- bad input -----------------------------------------------------------------------------------------------

def corrupt_copy(built, tmp_path, fix_sidecar: bool):
    blob = tmp_path / "bad.onnx_adapter"
    data = bytearray(built["blobs"]["a"].read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    data = bytes(data[: len(data) // 2]) if fix_sidecar else bytes(data)
    blob.write_bytes(data)
    info = json.loads(built["blobs"]["a"].with_name("a.onnx_adapter.json").read_text())
    if fix_sidecar:  # a checksum that matches a truncated file: the backend's reader must refuse it
        from ondevice_lora.formats.manifest import sha256_file

        info.update(sha256=sha256_file(blob), size=blob.stat().st_size)
    blob.with_name(blob.name + ".json").write_text(json.dumps(info))
    return blob


def edited_sidecar(built, tmp_path, **changes):
    blob = tmp_path / "edited.onnx_adapter"
    shutil.copy(built["blobs"]["a"], blob)
    info = json.loads(built["blobs"]["a"].with_name("a.onnx_adapter.json").read_text())
    blob.with_name(blob.name + ".json").write_text(json.dumps({**info, **changes}))
    return blob


BAD_BLOBS = {
    "missing": (lambda built, tmp: tmp / "nope.onnx_adapter", "no such packed adapter"),
    "no sidecar": (lambda built, tmp: Path(shutil.copy(built["blobs"]["a"], tmp / "lone.onnx_adapter")), "no sidecar"),
    "other base": (lambda built, tmp: edited_sidecar(built, tmp, base_fingerprint="sha256:" + "0" * 64), "a different base"),
    "other target": (lambda built, tmp: edited_sidecar(built, tmp, target="executorch"), "packed for a executorch export"),
    "other export": (lambda built, tmp: built["root"] / "b-qv.onnx_adapter", "do not match this export's slots"),
    "corrupt": (lambda built, tmp: corrupt_copy(built, tmp, fix_sidecar=False), "corrupt"),
    "corrupt, sidecar agrees": (lambda built, tmp: corrupt_copy(built, tmp, fix_sidecar=True), "not a readable"),
}


@pytest.mark.parametrize("case", list(BAD_BLOBS))
def test_bad_blobs_are_refused_at_registration(built, onnx_rt, tmp_path, case):
    make, message = BAD_BLOBS[case]
    with pytest.raises(OdloraError, match=message):
        onnx_rt.register_adapter("bad-" + re.sub(r"\W+", "-", case), make(built, tmp_path))  # an id is one word
    assert "bad-" + re.sub(r"\W+", "-", case) not in onnx_rt.adapters
    assert run_case(onnx_rt, "a") == built["expected"]["a"]  # the runtime keeps serving


BAD_REQUESTS = {
    "unknown id": (dict(adapter="zzz"), r"unknown adapter 'zzz' \(registered: a, b, c"),
    "unknown id in a blend": (dict(adapter=[("a", 1.0), ("zzz", 0.5)]), "unknown adapter 'zzz'"),
    "blend over the slots' rank": (dict(adapter=["a", "c"]), r"blend a \(rank 4\) \+ c \(rank 6\) needs rank 10 .* rank <= 8"),
    "nan weight": (dict(adapter=[("a", float("nan"))]), "finite weight"),
    "bad strength": (dict(adapter="a", strength=float("inf")), "strength must be a finite number"),
    "bad adapter type": (dict(adapter=3), "adapter must be None, an id or a list"),
    "prompt too long": (dict(prompt="The cat looks at the river. " * 20), f"max_seq_len {MAX_SEQ}"),
    "message without a role": (dict(prompt=[{"content": "hi"}]), "a prompt is a string, a list of"),
    "a token id past the vocabulary": (dict(prompt=[1, 10**6]), "prompt: 1000000 is not a token id"),
    "no messages": (dict(prompt=[]), "a prompt is a string, a list of"),
    "bad sampling": (dict(sampling=SamplingConfig(max_new_tokens=0)), "max_new_tokens: must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_alone(built, onnx_rt, case):
    kwargs, message = BAD_REQUESTS[case]
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(OdloraError, match=message):
        onnx_rt.generate(kwargs.pop("prompt"), **kwargs)
    assert run_case(onnx_rt, "a+b") == built["expected"]["a+b"]


def test_reregister_and_unregister(built):
    rt = Runtime.open(built["export"], threads=1)
    rt.register_adapter("x", built["blobs"]["a"])
    assert run_case_named(rt, "x") == built["expected"]["a"]
    rt.register_adapter("x", built["blobs"]["b"])  # the same id, another blob: replaced
    assert run_case_named(rt, "x") == built["expected"]["b"]
    rt.unregister_adapter("x")
    with pytest.raises(OdloraError, match=r"unknown adapter 'x' \(registered: none\)"):
        run_case_named(rt, "x")
    for name in ("base", "a:b", "a+b", ""):  # a request could not name these (formats/adapter_ids.py)
        with pytest.raises(OdloraError, match="adapter id"):
            rt.register_adapter(name, built["blobs"]["a"])


def run_case_named(rt, adapter_id):
    return rt.generate(PROMPT, adapter=adapter_id, sampling=GREEDY).text


def test_a_blob_changed_after_registration_is_caught_on_reload(built, tmp_path):
    blob = Path(shutil.copy(built["blobs"]["a"], tmp_path / "a.onnx_adapter"))
    shutil.copy(built["blobs"]["a"].with_name("a.onnx_adapter.json"), tmp_path / "a.onnx_adapter.json")
    rt = Runtime.open(built["export"], cache_bytes=0)  # nothing stays cached: every request reloads
    rt.register_adapter("mine", blob)
    assert rt.generate(PROMPT, adapter="mine", sampling=GREEDY).text == built["expected"]["a"]
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(OdloraError, match="corrupt"):
        rt.generate(PROMPT, adapter="mine", sampling=GREEDY)


def test_open_checks_the_export(built, tmp_path):
    copy = Path(shutil.copytree(built["export"], tmp_path / "export"))
    config = copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(OdloraError, match="does not match its manifest checksum"):
        Runtime.open(copy)
    with pytest.raises(OdloraError, match="not an odlora export"):
        Runtime.open(tmp_path)
    with pytest.raises(OdloraError, match="onnx export: it runs on the onnx backend or on the torch reference"):
        Runtime.open(built["export"], backend="executorch")
    with pytest.raises(OdloraError, match="unknown runtime backend"):
        Runtime.open(built["export"], backend="tflite")


def test_coreml_export_is_refused_off_macos(built, tmp_path, monkeypatch):
    fake = tmp_path / "coreml"
    shutil.copytree(built["export"] / "tokenizer", fake / "tokenizer")
    manifest = json.loads((built["export"] / "manifest.json").read_text())
    manifest.update(target="coreml", files={}, coreml={"package": "model.mlpackage", "inputs": {}})
    (fake / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(OdloraError, match="Core ML runs models only on macOS"):
        Runtime.open(fake)


# -- ExecuTorch ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def executorch_export(built):
    pytest.importorskip("executorch")
    root = built["root"]
    export(str(built["base_dir"]), "executorch", root / "executorch", max_rank=8, max_seq_len=MAX_SEQ, say=quiet)
    blobs = {}
    for name in ADAPTERS:
        blobs[name] = root / f"{name}.slots"
        pack(built["dirs"][name], root / "executorch", blobs[name])
    return root / "executorch", blobs


def test_executorch_matches_pytorch_swaps_and_serialises_threads(built, executorch_export, monkeypatch):
    from executorch.runtime import Runtime as EtRuntime

    loads = []
    real = EtRuntime.load_program
    monkeypatch.setattr(EtRuntime, "load_program", lambda self, *a, **k: loads.append(1) or real(self, *a, **k))
    export_dir, blobs = executorch_export
    rt = Runtime.open(export_dir, threads=1)
    assert rt.backend.name == "executorch" and rt.backend.serial
    for name, blob in blobs.items():
        rt.register_adapter(name, blob)
    program = rt.backend.session.program
    for case in ("a", "none", "b", "a", "a+b", "a@0.5", "0.7a+0.4b@0.5"):
        assert run_case(rt, case) == built["expected"][case], f"{case} after a swap"
    assert len(loads) == 1 and rt.backend.session.program is program
    check_threads(rt, built["expected"], n_threads=8, per_thread=2)
    with pytest.raises(OdloraError, match="packed for a onnx export"):
        rt.register_adapter("onnx-blob", built["blobs"]["a"])


# -- odlora run ---------------------------------------------------------------------------------------------

def test_cli_run_blends_streams_and_prints_json(built, onnx_rt, monkeypatch, capsys):
    blobs = built["blobs"]
    code, out, err = run_cli(monkeypatch, capsys, "run", "--export", built["export"], "--adapter", blobs["a"],
                             "--adapter", f"{blobs['b']}:0.5", "--prompt", PROMPT, "--max-new-tokens", 10, "--json")
    assert code == 0, err
    expected = onnx_rt.generate(PROMPT, adapter=[("a", 1.0), ("b", 0.5)], sampling=GREEDY).text
    *text, last = out.rstrip("\n").split("\n")
    info = json.loads(last)
    assert "\n".join(text) == info["text"] == expected
    assert info["adapter"] == "a:1+b:0.5" and info["tokens"] == 10 and info["seconds"] > 0
    code, out, _ = run_cli(monkeypatch, capsys, "run", "--export", built["export"], "--prompt", PROMPT, "--max-new-tokens", 10)
    assert code == 0 and out == built["expected"]["none"] + "\n"


@pytest.mark.parametrize("args,message", [
    (("--adapter", "missing.onnx_adapter"), "no such packed adapter"),
    (("--adapter", "{root}/b-qv.onnx_adapter"), "do not match this export's slots"),
    (("--prompt", "The cat looks at the river. " * 20), "--max-seq-len"),
    (("--temperature", "-1"), "--temperature: must be a number from 0 to 2"),
    (("--backend", "executorch"), "onnx export: it runs on the onnx backend"),
])
def test_cli_run_bad_input_is_one_clear_line(built, monkeypatch, capsys, args, message):
    args = [a.format(root=built["root"]) for a in args]
    prompt = [] if "--prompt" in args else ["--prompt", PROMPT]
    code, _, err = run_cli(monkeypatch, capsys, "run", "--export", built["export"], *prompt, *args)
    assert code == 2 and err.startswith("odlora: error: ") and message in err and err.count("\n") == 1
