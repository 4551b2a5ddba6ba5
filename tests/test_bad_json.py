"""Every JSON file odlora reads, corrupted one field at a time, and PEFT tensors that are not LoRA factors.

    python -m pytest -q tests/test_bad_json.py      # one tiny ONNX export, packed and bundled once (~40 s)

Each case runs the `odlora` command that reads the file and asserts: exit 2, exactly one line on
stderr starting `odlora: error:` that names the file and the field, nothing on stdout, and every
file under the case's directory (inputs and would-be outputs) exactly as before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file, save_file

from ondevice_lora.formats import schemas
from ondevice_lora.adapter import load_adapter
from ondevice_lora.errors import OdloraError
from ondevice_lora.fingerprint import cached_fingerprint
from ondevice_lora.prompts import PROMPT_FORMATS
from ondevice_lora.formats.schemas import read_json, to_dict
from ondevice_lora.train import save_checkpoint
from conftest import run_cli
from test_runtime import make_adapter

SHA = "0" * 64
MODULE = "model.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"base_model.model.{MODULE}.lora_A.weight", f"base_model.model.{MODULE}.lora_B.weight"
RANK = 4


@pytest.fixture(scope="module")
def valid(tiny_model_factory, tmp_path_factory):
    """One of each file kind, as odlora writes it: an adapter, an ONNX export, a packed blob, a
    bundle, a checkpoint, a demo state, a base directory with a safetensors index."""
    from ondevice_lora.exporters.export import export, pack
    from ondevice_lora.runtime.bundle import write_bundle

    root = tmp_path_factory.mktemp("valid")
    base_dir = tiny_model_factory("llama")
    export(str(base_dir), "onnx", root / "export", quant="fp32", max_rank=8, max_seq_len=32, say=lambda *_: None)
    make_adapter(base_dir, root / "adapter", 1, RANK, ("q_proj", "v_proj"))
    pack(root / "adapter", root / "export", root / "a.onnx_adapter")
    write_bundle(root / "export", [("a", root / "a.onnx_adapter")], root / "bundle")
    params = {"p": torch.zeros(2)}
    optimizer = torch.optim.AdamW(params.values())
    save_checkpoint(root / ".ad.checkpoint", params, optimizer,
                    {"step": 1, "history": {"val": [{"step": 0, "loss": 2.5, "perplexity": 12.2, "tokens": 9}]},
                     "identity": {"base": "sha256:" + SHA}}, torch.get_rng_state())
    (root / "demo").mkdir()
    (root / "demo" / "demo-state.json").write_text(json.dumps(
        {"personalize dates": {"key": {"steps": 2}, "result": {"dir": "adapters/dates"}}}))
    base = Path(shutil.copytree(base_dir, root / "base"))
    names = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: the cat sat on mat {i}"}) + "\n" for i in range(12)))
    return {"root": root, "base": base, "export": root / "export", "adapter": root / "adapter",
            "blob": root / "a.onnx_adapter", "bundle": root / "bundle", "data": data}


# -- the file kinds: where each file lives in a case's copy, and the command that reads it -------------------

def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst))


def adapter_case(v, tmp, name):
    ad = _copy(v["adapter"], tmp / "ad")
    return ad / name, ["adapter", "pack", ad, "--export", v["export"], "--out", tmp / "out.onnx_adapter"]


def manifest_case(v, tmp):
    export = _copy(v["export"], tmp / "export")
    return export / "manifest.json", ["adapter", "pack", v["adapter"], "--export", export, "--out", tmp / "out.onnx_adapter"]


def sidecar_case(v, tmp):
    blob = _copy(v["blob"], tmp / "a.onnx_adapter")
    _copy(v["blob"].with_name("a.onnx_adapter.json"), tmp / "a.onnx_adapter.json")
    return tmp / "a.onnx_adapter.json", ["bundle", "--export", v["export"], "--adapter", f"a={blob}", "--out", tmp / "b"]


def bundle_case(v, tmp):
    bundle = _copy(v["bundle"], tmp / "bundle")
    return bundle / "bundle.json", ["verify", bundle]


def state_case(v, tmp):
    checkpoint = _copy(v["root"] / ".ad.checkpoint", tmp / ".ad.checkpoint")
    return checkpoint / "state.json", ["personalize", "--base", v["base"], "--data", v["data"], "--out", tmp / "ad",
                                       "--resume", "--steps", 2, "--rank", 2, "--seq-len", 16, "--batch-size", 2]


def demo_case(v, tmp):
    demo = _copy(v["root"] / "demo", tmp / "demo")
    return demo / "demo-state.json", ["demo", "--base", v["base"], "--out", demo, "--targets", "onnx"]


def base_case(v, tmp, name):
    base = _copy(v["base"], tmp / "base")
    return base / name, ["export", "--base", base, "--target", "onnx", "--out", tmp / "out-export"]


KINDS = {
    "adapter_config": lambda v, tmp: adapter_case(v, tmp, "adapter_config.json"),
    "odlora": lambda v, tmp: adapter_case(v, tmp, "odlora.json"),
    "manifest": manifest_case,
    "sidecar": sidecar_case,
    "bundle": bundle_case,
    "state": state_case,
    "demo_state": demo_case,
    "hf_config": lambda v, tmp: base_case(v, tmp, "config.json"),
    "hf_index": lambda v, tmp: base_case(v, tmp, "model.safetensors.index.json"),
}
SCHEMAS = {"adapter_config": schemas.PeftAdapterConfig, "odlora": schemas.AdapterMeta, "manifest": schemas.ExportManifest,
           "sidecar": schemas.PackedSidecar, "bundle": schemas.BundleManifest, "state": schemas.CheckpointState,
           "demo_state": schemas.DemoState, "hf_config": schemas.HFConfig, "hf_index": schemas.SafetensorsIndex}


# -- corruptions: an edit of the parsed file (returns the new content) and what the error must name ----------

def put(*path_and_value):
    """Set one nested field: put("slots", "max_rank", 0)."""
    *path, value = path_and_value

    def edit(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return obj
    return edit


def drop(*path):
    def edit(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return obj
    return edit


def raw(content):
    return lambda obj: content


def first_file(field, value):
    """Set `field` of the first entry of `files` (a manifest's or a bundle's)."""
    def edit(obj):
        obj["files"][next(iter(obj["files"]))][field] = value
        return obj
    return edit


def add_file(name):
    def edit(obj):
        obj["files"][name] = {"sha256": SHA, "size": 1}
        return obj
    return edit


# Whole-file damage, the same for every kind.
EVERY_KIND = [
    ("not JSON", raw("{not json"), "invalid JSON"),
    ("truncated", raw('{"format": '), "invalid JSON"),
    ("not UTF-8", raw(b'{"x": "\xff\xfe"}'), "not UTF-8 text (byte offset 7)"),
    ("top-level list", raw("[1, 2]"), "must be a JSON object, got a list"),
]

CASES = {
    "adapter_config": [
        ("r a word", put("r", "eight"), 'r: must be an integer, got "eight"'),
        ("r a numeral string", put("r", "8"), 'r: must be an integer, got "8"'),
        ("r zero", put("r", 0), "r: must be >= 1, got 0"),
        ("r negative", put("r", -4), "r: must be >= 1, got -4"),
        ("r fractional", put("r", 4.5), "r: must be an integer, got 4.5"),
        ("r a boolean", put("r", True), "r: must be an integer, got true"),
        ("r huge", put("r", 10**9), "r: must be <= 65536"),
        ("r NaN", put("r", float("nan")), "r: must be an integer, got NaN"),
        ("lora_alpha a string", put("lora_alpha", "16"), 'lora_alpha: must be a number, got "16"'),
        ("lora_alpha NaN", put("lora_alpha", float("nan")), "lora_alpha: must be a finite number, got NaN"),
        ("lora_alpha infinite", put("lora_alpha", float("inf")), "lora_alpha: must be a finite number, got Infinity"),
        ("lora_alpha zero", put("lora_alpha", 0), "lora_alpha: must be > 0"),
        ("lora_alpha negative", put("lora_alpha", -16), "lora_alpha: must be > 0"),
        ("lora_dropout one", put("lora_dropout", 1.0), "lora_dropout: must be < 1"),
        ("alpha_pattern a list", put("alpha_pattern", ["q_proj"]), "alpha_pattern: must be an object, got a list"),
        ("alpha_pattern bad regex", put("alpha_pattern", {"q_proj[": 8}), 'alpha_pattern key "q_proj[": is not a valid regular expression'),
        ("alpha_pattern value a string", put("alpha_pattern", {"q_proj": "8"}), 'alpha_pattern.q_proj: must be a number, got "8"'),
        ("alpha_pattern value NaN", put("alpha_pattern", {"q_proj": float("nan")}), "alpha_pattern.q_proj: must be a finite number"),
        ("rank_pattern bad regex", put("rank_pattern", {"(q": 4}), 'rank_pattern key "(q": is not a valid regular expression'),
        ("rank_pattern zero", put("rank_pattern", {"q_proj": 0}), "rank_pattern.q_proj: must be >= 1"),
        ("target_modules a number", put("target_modules", 3), "target_modules: must be a list of module names or a regex string, got 3"),
        ("target_modules numbers", put("target_modules", [1, 2]), "target_modules: must be a list of module names"),
        ("use_rslora a string", put("use_rslora", "yes"), 'use_rslora: must be true or false, got "yes"'),
        ("use_dora a number", put("use_dora", 0), "use_dora: must be true or false, got 0"),
        ("use_dora true", put("use_dora", True), "use_dora=true is not supported"),
        ("peft_type a number", put("peft_type", 3), "peft_type: must be a string, got 3"),
        ("peft_type not LoRA", put("peft_type", "IA3"), "peft_type 'IA3' is not LORA"),
        ("layers_to_transform negative", put("layers_to_transform", [-1]), "layers_to_transform: must be a layer index or a list"),
        ("modules_to_save a string", put("modules_to_save", "lm_head"), 'modules_to_save: must be a list, got "lm_head"'),
        ("base_model_name_or_path a number", put("base_model_name_or_path", 5), "base_model_name_or_path: must be a string, got 5"),
        ("nested too deep", raw("[" * 100_000), "invalid JSON (recursion limit exceeded"),
        ("empty file", raw(""), "invalid JSON"),
    ],
    "odlora": [
        ("base_fingerprint not a fingerprint", put("base_fingerprint", "abc"), "base_fingerprint: must be 'sha256:' and 64"),
        ("base_fingerprint a number", put("base_fingerprint", 5), "base_fingerprint: must be a string, got 5"),
        ("rank a string", put("rank", "8"), 'rank: must be an integer, got "8"'),
        ("modules zero", put("modules", 0), "modules: must be >= 1"),
        ("targets a string", put("targets", "q_proj"), 'targets: must be a list, got "q_proj"'),
        ("metrics a list", put("metrics", [1]), "metrics: must be an object, got a list"),
        ("format another", put("format", "odlora-export"), "format: must be 'odlora-adapter'"),
        ("prompt_format unknown", put("prompt_format", "alpaca"), "prompt_format: must be 'chat' or 'raw', got \"alpaca\""),
    ],
    "manifest": [
        ("no slots", drop("slots"), "an export for onnx needs its 'slots'"),
        ("slots a list", put("slots", [1]), "slots: must be an object, got a list"),
        ("slots.max_rank a string", put("slots", "max_rank", "8"), 'slots.max_rank: must be an integer, got "8"'),
        ("slots.max_rank zero", put("slots", "max_rank", 0), "slots.max_rank: must be >= 1"),
        ("slots.n_layers NaN", put("slots", "n_layers", float("nan")), "slots.n_layers: must be an integer, got NaN"),
        ("slots.targets empty", put("slots", "targets", []), "slots.targets: must have at least 1 item"),
        ("slots.targets unknown", put("slots", "targets", ["q_proj", "zz_proj"]), "slots: slot target 'zz_proj' is not one of"),
        ("slots.features lacking", drop("slots", "features", "q_proj"), "slots: slot target 'q_proj' has no features"),
        ("slots.features one number", put("slots", "features", "q_proj", [64]), 'slots.features.q_proj: must have at least 2'),
        ("slots.layout changed", put("slots", "max_rank", 4), "slots: layout does not match"),
        ("files a list", put("files", []), "files: must be an object, got a list"),
        ("files entry a list", lambda m: {**m, "files": {k: [1] for k in m["files"]}}, "must be an object, got a list"),
        ("files sha256 short", first_file("sha256", "abc"), 'sha256: must be 64 lowercase hex digits (a sha256), got "abc"'),
        ("files size negative", first_file("size", -1), "size: must be >= 0, got -1"),
        ("files size a string", first_file("size", "10"), 'size: must be an integer, got "10"'),
        ("files path traversal", add_file("../../etc/passwd"), "files key \"../../etc/passwd\": path '../../etc/passwd' leaves the export"),
        ("files absolute path", add_file("/etc/passwd"), "path '/etc/passwd' leaves the export"),
        ("base_fingerprint missing", drop("base_fingerprint"), "base_fingerprint: is missing"),
        ("base_fingerprint malformed", put("base_fingerprint", "sha256:xyz"), "base_fingerprint: must be 'sha256:'"),
        ("format_version 2", put("format_version", 2), "unknown export format version 2 (this odlora reads version 1)"),
        ("format_version a string", put("format_version", "1"), 'unknown export format version "1"'),
        ("format another", put("format", "odlora-bundle"), 'not an odlora export (format "odlora-bundle")'),
        ("max_seq_len zero", put("max_seq_len", 0), "max_seq_len: must be >= 1"),
        ("target a number", put("target", 5), "target: must be a string, got 5"),
        ("no onnx section", drop("onnx"), "an export for onnx needs its 'onnx' section"),
        ("onnx.model absolute", put("onnx", "model", "/etc/passwd"), "onnx.model: path '/etc/passwd' leaves the export"),
        ("onnx.inputs a string", put("onnx", "inputs", "x"), 'onnx.inputs: must be a list, got "x"'),
        ("onnx cache shape short", put("onnx", "cache_layout", "shape", [1, 2]), "onnx.cache_layout.shape: must have at least 4"),
        ("onnx cache names missing", drop("onnx", "cache_layout", "past"), "onnx.cache_layout.past: is missing"),
        ("onnx input shape a boolean", lambda m: put("onnx", "inputs", [{"name": "x", "shape": [True]}])(m),
         "onnx.inputs[0].shape[0]: must be a dimension"),
    ],
    "sidecar": [
        ("format missing", drop("format"), "not an odlora packed-adapter sidecar (format null)"),
        ("format another", put("format", "odlora-export"), 'not an odlora packed-adapter sidecar (format "odlora-export")'),
        ("format_version 2", put("format_version", 2), "unknown packed-adapter sidecar format version 2"),
        ("target a number", put("target", 3), "target: must be a string, got 3"),
        ("base_fingerprint missing", drop("base_fingerprint"), "base_fingerprint: is missing"),
        ("base_fingerprint a list", put("base_fingerprint", ["sha256"]), "base_fingerprint: must be a string, got a list"),
        ("sha256 not hex", put("sha256", "z" * 64), "sha256: must be 64 lowercase hex digits"),
        ("sha256 missing", drop("sha256"), "sha256: is missing"),
        ("size a string", put("size", "12"), 'size: must be an integer, got "12"'),
        ("size negative", put("size", -1), "size: must be >= 0"),
        ("size infinite", put("size", float("inf")), "size: must be an integer, got Infinity"),
        ("rank zero", put("rank", 0), "rank: must be >= 1"),
        ("metrics a list", put("metrics", []), "metrics: must be an object, got a list"),
        ("prompt_format a boolean", put("prompt_format", True), "prompt_format: must be 'chat' or 'raw', got true"),
    ],
    "bundle": [
        ("format_version 2", put("format_version", 2), "unknown bundle format version 2"),
        ("format another", put("format", "zip"), 'not an odlora bundle (format "zip")'),
        ("kind unknown", put("kind", "app"), "kind: must be 'base' or 'adapters', got \"app\""),
        ("files a list", put("files", ["base/model.onnx"]), "files: must be an object, got a list"),
        ("files empty", put("files", {}), "files: must have at least 1 item"),
        ("files entry a string", lambda m: {**m, "files": {k: "x" for k in m["files"]}}, "must be an object, got \"x\""),
        ("files size a string", first_file("size", "1"), 'size: must be an integer, got "1"'),
        ("files size a float", first_file("size", 1.5), "size: must be an integer, got 1.5"),
        ("files sha256 upper case", first_file("sha256", "A" * 64), "sha256: must be 64 lowercase hex digits"),
        ("files path traversal", add_file("../outside.txt"), "path '../outside.txt' leaves the bundle"),
        ("files absolute path", add_file("/etc/passwd"), "path '/etc/passwd' leaves the bundle"),
        ("files backslash path", add_file("adapters\\..\\..\\x"), "leaves the bundle"),
        ("adapters a string", put("adapters", "a"), 'adapters: must be a list, got "a"'),
        ("adapter file traversal", put("adapters", [{"id": "a", "file": "../../a.onnx_adapter"}]),
         "adapters[0].file: path '../../a.onnx_adapter' leaves the bundle"),
        ("adapter id a number", put("adapters", [{"id": 5, "file": "adapters/a.onnx_adapter"}]), "adapters[0].id: must be a string, got 5"),
        ("adapter rank a string", put("adapters", [{"id": "a", "file": "adapters/a.onnx_adapter", "rank": "4"}]),
         'adapters[0].rank: must be an integer, got "4"'),
        ("slots missing", drop("slots"), "slots: is missing"),
        ("base_fingerprint malformed", put("base_fingerprint", "sha256:"), "base_fingerprint: must be 'sha256:'"),
        ("prompt stop_ids words", put("prompt", "stop_ids", ["<|im_end|>"]), 'prompt.stop_ids[0]: must be an integer, got "<|im_end|>"'),
        ("max_seq_len NaN", put("max_seq_len", float("nan")), "max_seq_len: must be an integer, got NaN"),
        ("adapter prompt_format unknown", put("adapters", [{"id": "a", "file": "adapters/a.onnx_adapter", "prompt_format": "x"}]),
         "adapters[0].prompt_format: must be 'chat' or 'raw'"),
    ],
    "state": [
        ("step a string", put("step", "1"), 'step: must be an integer, got "1"'),
        ("step negative", put("step", -1), "step: must be >= 0, got -1"),
        ("history missing", drop("history"), "history: is missing"),
        ("history.val empty", put("history", "val", []), "history.val: must have at least 1 item"),
        ("val loss NaN", put("history", "val", [{"step": 0, "loss": float("nan")}]), "history.val[0].loss: must be a finite number"),
        ("identity a list", put("identity", []), "identity: must be an object, got a list"),
        ("sha256 missing", drop("sha256"), "sha256: is missing"),
        ("sha256 a number", put("sha256", 0), "sha256: must be a string, got 0"),
    ],
    "demo_state": [
        ("stage a list", put("personalize dates", []), '["personalize dates"]: must be an object, got a list'),
        ("stage without key", drop("personalize dates", "key"), '["personalize dates"].key: is missing'),
    ],
    "hf_config": [
        ("vocab_size a string", put("vocab_size", "400"), 'vocab_size: must be an integer, got "400"'),
        ("num_hidden_layers zero", put("num_hidden_layers", 0), "num_hidden_layers: must be >= 1"),
        ("num_attention_heads fractional", put("num_attention_heads", 4.5), "num_attention_heads: must be an integer, got 4.5"),
        ("rms_norm_eps NaN", put("rms_norm_eps", float("nan")), "rms_norm_eps: must be a finite number"),
        ("tie_word_embeddings a string", put("tie_word_embeddings", "yes"), 'tie_word_embeddings: must be true or false'),
        ("rope_scaling a list", put("rope_scaling", [8.0]), "rope_scaling: must be an object, got a list"),
        ("model_type a number", put("model_type", 5), "model_type: must be a string, got 5"),
    ],
    "hf_index": [
        ("weight_map a list", put("weight_map", []), "weight_map: must be an object, got a list"),
        ("weight_map empty", put("weight_map", {}), "weight_map: must have at least 1 item"),
        ("shard outside the directory", put("weight_map", {"x": "../../elsewhere.safetensors"}),
         "weight_map.x: path '../../elsewhere.safetensors' leaves the model directory"),
        ("shard a number", put("weight_map", {"x": 1}), "weight_map.x: must be a string, got 1"),
    ],
}
TABLE = [pytest.param(kind, edit, named, id=f"{kind}: {name}")
         for kind, cases in CASES.items() for name, edit, named in [*EVERY_KIND, *cases]]


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (or its kind, for what is not a regular file)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else ("dir" if p.is_dir() else "special")
            for p in sorted(root.rglob("*"))}


# `personalize` prints its data and LoRA summary lines before --resume reads the checkpoint.
PROGRESS_FIRST = {"state"}


def assert_refused(monkeypatch, capsys, tmp_path, argv, file, *named, progress_first=False):
    before = snapshot(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert (len(lines) >= 1 if progress_first else len(lines) == 1), err
    assert lines[-1].startswith("odlora: error: ") and err.count("odlora: error:") == 1, err
    assert str(file) in lines[-1] and all(n in lines[-1] for n in named), lines[-1]
    assert out == "" and "Traceback" not in err
    assert snapshot(tmp_path) == before, "a refused command changed files"


@pytest.mark.parametrize("kind,edit,named", TABLE)
def test_a_corrupted_json_file_is_one_clean_error(valid, tmp_path, monkeypatch, capsys, kind, edit, named):
    file, argv = KINDS[kind](valid, tmp_path)
    content = edit(json.loads(file.read_text()))
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content if isinstance(content, str) else json.dumps(content))
    assert_refused(monkeypatch, capsys, tmp_path, argv, file, named, progress_first=kind in PROGRESS_FIRST)


@pytest.mark.parametrize("kind", ["adapter_config", "manifest", "sidecar", "bundle"])
@pytest.mark.parametrize("make,named", [
    (lambda f: (f.unlink(), f.mkdir()), "not a regular file"),
    (lambda f: (f.unlink(), os.mkfifo(f)), "not a regular file"),  # read, it would hang
    (lambda f: os.truncate(f, schemas.MAX_JSON_BYTES + 1), "is over the limit of 64.0 MiB"),
], ids=["a directory", "a FIFO", "too large"])
def test_a_json_path_that_is_no_small_regular_file_is_refused(valid, tmp_path, monkeypatch, capsys, kind, make, named):
    file, argv = KINDS[kind](valid, tmp_path)
    make(file)
    assert_refused(monkeypatch, capsys, tmp_path, argv, file, named)


def test_the_schemas_prompt_formats_are_the_runtimes():
    assert get_args(schemas.PromptFormat) == PROMPT_FORMATS


@pytest.mark.parametrize("kind", list(KINDS))
def test_valid_files_pass_their_schema_unchanged(valid, tmp_path, kind):
    """What the readers hand on is the file's own dict: valid files behave as before the schemas."""
    file, _ = KINDS[kind](valid, tmp_path)
    assert to_dict(read_json(file, SCHEMAS[kind])) == json.loads(file.read_text())


# -- PEFT tensors --------------------------------------------------------------------------------------------

def _set(key, value):
    return lambda t, cfg: t.__setitem__(key, value(t))


def _rename(old, new):
    return lambda t, cfg: t.__setitem__(new, t.pop(old))


def _both(a, b):
    return lambda t, cfg: t.update({A_KEY: a(t), B_KEY: b(t)})


TENSOR_CASES = {
    "rank 0": (_both(lambda t: torch.zeros(0, 64), lambda t: torch.zeros(64, 0)), A_KEY, "rank 0"),
    "lora_B 1-D": (_set(B_KEY, lambda t: t[B_KEY][:, 0].contiguous()), B_KEY, "a LoRA factor is a matrix"),
    "lora_A 3-D": (_set(A_KEY, lambda t: t[A_KEY][None].contiguous()), A_KEY, "a LoRA factor is a matrix"),
    "lora_A a scalar": (_set(A_KEY, lambda t: torch.tensor(1.0)), A_KEY, "a LoRA factor is a matrix"),
    "no input features": (_set(A_KEY, lambda t: torch.zeros(RANK, 0)), A_KEY, "no features"),
    "inner dims differ": (_set(B_KEY, lambda t: t[B_KEY][:, :2].contiguous()), A_KEY, "disagree on the rank"),
    "rank is not the config's r": (_both(lambda t: t[A_KEY][:2].contiguous(), lambda t: t[B_KEY][:, :2].contiguous()),
                                   A_KEY, f"has rank 2, adapter_config.json says {RANK}"),
    "rank is not rank_pattern's": (lambda t, cfg: cfg.update(rank_pattern={"q_proj": 2}), A_KEY, "has rank 4, adapter_config.json says 2"),
    "NaN in lora_A": (_set(A_KEY, lambda t: t[A_KEY].index_fill(0, torch.tensor([1]), float("nan"))), A_KEY, "NaN or infinite"),
    "inf in lora_B": (_set(B_KEY, lambda t: t[B_KEY].index_fill(1, torch.tensor([0]), float("inf"))), B_KEY, "NaN or infinite"),
    "integer lora_A": (_set(A_KEY, lambda t: t[A_KEY].to(torch.int32)), A_KEY, "is int32, not floating point"),
    "a key naming no module": (_rename(A_KEY, "base_model.model.lora_A.weight"), "base_model.model.lora_A.weight", "unexpected tensor"),
    "an empty module path": (_rename(A_KEY, A_KEY.replace("layers.0", "layers..0")), "layers..0", "unexpected tensor"),
    "not a LoRA factor": (_rename(A_KEY, A_KEY.replace("lora_A", "lora_C")), "lora_C", "unexpected tensor"),
    "lora_B missing": (lambda t, cfg: t.pop(B_KEY), MODULE, "lacks its lora_B tensor"),
    "no LoRA tensors": (lambda t, cfg: t.clear(), "", "holds no LoRA tensors"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensors_that_are_not_lora_factors_are_one_clean_error(valid, tmp_path, monkeypatch, capsys, case):
    edit, key, named = TENSOR_CASES[case]
    weights, argv = adapter_case(valid, tmp_path, "adapter_model.safetensors")
    tensors, config_file = load_file(str(weights)), weights.with_name("adapter_config.json")
    cfg = json.loads(config_file.read_text())
    edit(tensors, cfg)
    save_file(tensors, str(weights))
    config_file.write_text(json.dumps(cfg))
    assert_refused(monkeypatch, capsys, tmp_path, argv, weights, key, named)
    with pytest.raises(OdloraError, match="adapter_model.safetensors: .*" + key.replace(".", r"\.")):
        load_adapter(weights.parent)


def test_peft_patterns_set_each_modules_rank_and_scale(valid, tmp_path):
    """rank_pattern and alpha_pattern as PEFT writes them: q_proj at rank 2 with its own alpha."""
    ad = _copy(valid["adapter"], tmp_path / "ad")
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    q = [k for k in tensors if ".q_proj." in k]
    tensors.update({k: tensors[k][:2].contiguous() if "lora_A" in k else tensors[k][:, :2].contiguous() for k in q})
    save_file(tensors, str(ad / "adapter_model.safetensors"))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {r"q_\w+": 1}}))
    adapter = load_adapter(ad)
    assert adapter.scalings[MODULE] == 1 / 2 and adapter.scalings[MODULE.replace("q_proj", "v_proj")] == 2 * RANK / RANK
    assert adapter.A[MODULE].shape[0] == 2 and adapter.config.rank == RANK


# -- caches: damaged is recomputed, never trusted nor fatal -----------------------------------------------------

@pytest.mark.parametrize("damage", ["[]", "{not json", '{"files": [], "fingerprint": "sha256:x"}', '{"files": 3}'])
def test_a_damaged_fingerprint_cache_entry_is_recomputed(tmp_path, damage):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    calls = []

    def compute():
        calls.append(1)
        return "sha256:" + "1" * 64

    assert cached_fingerprint(tmp_path / "cache", [weights], compute) == "sha256:" + "1" * 64
    assert cached_fingerprint(tmp_path / "cache", [weights], compute) == "sha256:" + "1" * 64 and len(calls) == 1
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_text(damage)
    assert cached_fingerprint(tmp_path / "cache", [weights], compute) == "sha256:" + "1" * 64 and len(calls) == 2
