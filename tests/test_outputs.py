"""Never lose what the user owns: the refusal table of every command that writes.

Each writer x {--out is its input, lies inside it, contains it, a user's file, a user's directory
with files, a symbolic link, its own kind without --force}, each also with --force: exit 2, one
line naming the path, and the path, its inputs and its neighbours byte for byte as they were.
Its own kind with --force is replaced (for `export`, tests/test_crash_safety.py shows a complete
new export at the final path after --force).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ondevice_lora.adapter import load_adapter
from ondevice_lora.base import load_base
from ondevice_lora.errors import OdloraError
from ondevice_lora.formats.manifest import read_manifest
from ondevice_lora.merge import merge_to_dir
from ondevice_lora.outputs import ADAPTER, BUNDLE, EXPORT, MODEL, PACKED, check_output
from ondevice_lora.runtime import Runtime
from ondevice_lora.runtime.bundle import open_bundle
from ondevice_lora.runtime.server import APIError
from ondevice_lora.web.app import JobSpec, WebApp
from test_crash_safety import made, side_files, tree  # noqa: F401  (made: the session's outputs)
from conftest import run_cli


def snapshot(*paths: Path) -> dict:
    """Everything at and beside `paths` (names, bytes, link targets), to compare after a refusal."""
    seen = {}
    for path in paths:
        for p in sorted(path.parent.iterdir()):
            seen[str(p)] = str(p.readlink()) if p.is_symlink() else tree(p) if p.exists() else None
    return seen


@pytest.fixture(scope="module")
def outputs(made, tmp_path_factory):
    """`made`, plus beside each other in a small directory: a data directory, a copy of the base
    and a model merged with adapter b (the own kind of `merge`)."""
    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(made["base"], root / "base")
    (root / "data").mkdir()
    shutil.copyfile(made["data"], root / "data" / "dates.jsonl")
    base = load_base(str(root / "base"))
    merge_to_dir(base, load_adapter(made["dirs"]["b"]), root / "merged")
    return {**made, "base": root / "base", "data_dir": root / "data", "merged": root / "merged"}


def writers(o: dict) -> dict:
    """Writer -> (its CLI args writing to OUT, its inputs {name: path}, a path of its own kind)."""
    base = ["--base", o["base"]]
    return {
        "personalize": (["personalize", *base, "--data", o["data_dir"], "--steps", 1, "--batch-size", 4, "--rank", 4,
                         "--dtype", "fp32", "--base-quant", "none", "--eval-every", 0, "--save-every", 0],
                        {"--data": o["data_dir"], "--base": o["base"]}, o["dirs"]["b"]),
        "merge": (["merge", *base, "--adapter", o["dirs"]["a"]], {"--adapter": o["dirs"]["a"], "--base": o["base"]},
                  o["merged"]),
        "export": (["export", *base, "--target", "onnx", "--max-rank", 4, "--max-seq-len", 64], {"--base": o["base"]},
                   o["export"]),
        "pack": (["adapter", "pack", o["dirs"]["a"], "--export", o["export"]],
                 {"adapter": o["dirs"]["a"], "--export": o["export"]}, o["blobs"]["b"]),
        "bundle": (["bundle", "--export", o["export"], "--adapter", f"b={o['blobs']['b']}"],
                   {"--export": o["export"], "--adapter": o["blobs"]["b"]}, o["bundle"]),
    }


def place(case: str, inputs: dict, own: Path, tmp_path: Path) -> tuple[Path, str]:
    """The --out of `case` and what the refusal must say."""
    source = next(iter(inputs.values()))
    if case == "is its input":
        return source, "is the"
    if case == "inside its input":
        return (source / "sub" if source.is_dir() else source.parent / source.name / "x"), "inside the"
    if case == "contains its input":
        return source.parent, "contains the"
    if case == "a user's file":
        (tmp_path / "notes.txt").write_text("my notes\n")
        return tmp_path / "notes.txt", "is not"
    if case == "a user's directory":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("my notes\n")
        return tmp_path / "mine", "is not"
    if case == "a symbolic link":
        (tmp_path / "link").symlink_to(own)
        return tmp_path / "link", "symbolic link"
    copy = tmp_path / own.name
    (shutil.copytree if own.is_dir() else shutil.copyfile)(own, copy)
    if own.is_file():
        shutil.copyfile(own.with_name(own.name + ".json"), copy.with_name(copy.name + ".json"))
    return copy, "already exists (use --force"


CASES = ["is its input", "inside its input", "contains its input", "a user's file", "a user's directory",
         "a symbolic link", "its own kind"]


@pytest.mark.parametrize("case, force", [(case, force) for case in CASES for force in (False, True)
                                         if not (case == "its own kind" and force)])  # that one replaces: below
@pytest.mark.parametrize("writer", ["personalize", "merge", "export", "pack", "bundle"])
def test_a_writer_refuses_what_it_must_not_replace(outputs, tmp_path, monkeypatch, capsys, writer, case, force):
    args, inputs, own = writers(outputs)[writer]
    out, message = place(case, inputs, own, tmp_path)
    if writer == "pack" and case == "a user's directory":
        message = "is a directory"
    before = snapshot(out, *inputs.values())
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, *(["--force"] if force else []))
    assert code == 2 and err.startswith(f"odlora: error: --out {out}: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert snapshot(out, *inputs.values()) == before


@pytest.mark.parametrize("writer", ["personalize", "merge", "pack", "bundle"])
def test_own_kind_is_replaced_with_force(outputs, tmp_path, monkeypatch, capsys, writer):
    args, inputs, own = writers(outputs)[writer]
    out, _ = place("its own kind", inputs, own, tmp_path)
    before = tree(out)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--force")
    assert code == 0, err
    assert tree(out) != before and side_files(out) == []
    assert {"personalize": ADAPTER, "merge": MODEL, "pack": PACKED, "bundle": BUNDLE}[writer].matches(out)


def test_an_empty_directory_is_taken_and_a_file_as_parent_refused(outputs, tmp_path, monkeypatch, capsys):
    args, _, _ = writers(outputs)["personalize"]
    (tmp_path / "empty").mkdir()
    assert run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "empty")[0] == 0
    assert ADAPTER.matches(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "file" / "ad")
    assert code == 2 and "is not a directory" in err


@pytest.mark.parametrize("what", ["export weights", "adapter weights", "user sidecar"])
def test_pack_never_writes_over_another_file(outputs, tmp_path, monkeypatch, capsys, what):
    export_copy = tmp_path / "export"
    shutil.copytree(outputs["export"], export_copy)
    out = {"export weights": export_copy / "model.onnx.data",
           "adapter weights": outputs["dirs"]["a"] / "adapter_model.safetensors",
           "user sidecar": tmp_path / "x.onnx_adapter"}[what]
    (tmp_path / "x.onnx_adapter.json").write_text('{"mine": true}\n')  # a user's file where the sidecar would go
    before = snapshot(out, export_copy / "manifest.json", tmp_path / "x.onnx_adapter.json")
    code, _, err = run_cli(monkeypatch, capsys, "adapter", "pack", outputs["dirs"]["a"], "--export", export_copy,
                           "--out", out, "--force")
    assert code == 2 and f"--out {out}" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out, export_copy / "manifest.json", tmp_path / "x.onnx_adapter.json") == before


def test_bundle_copies_only_the_files_the_manifest_lists(outputs, tmp_path, monkeypatch, capsys):
    export_copy = tmp_path / "export"
    shutil.copytree(outputs["export"], export_copy)
    (tmp_path / "secret").write_text("not for the app")
    (export_copy / "notes.txt").write_text("unlisted")
    (export_copy / "elsewhere").symlink_to(tmp_path / "secret")
    code, _, err = run_cli(monkeypatch, capsys, "bundle", "--export", export_copy, "--out", tmp_path / "b")
    assert code == 0, err
    open_bundle(tmp_path / "b")  # complete: every file it lists is there, sha256 checked
    assert set(tree(tmp_path / "b" / "base")) == {"manifest.json", *read_manifest(export_copy)["files"]}
    assert not (tmp_path / "b" / "base" / "notes.txt").exists() and not (tmp_path / "b" / "base" / "elsewhere").exists()
    listed = next(name for name in tree(export_copy) if name.endswith(".onnx"))  # a listed file made a link
    (export_copy / listed).rename(tmp_path / "moved.onnx")
    (export_copy / listed).symlink_to(tmp_path / "moved.onnx")
    code, _, err = run_cli(monkeypatch, capsys, "bundle", "--export", export_copy, "--out", tmp_path / "b2")
    assert code == 2 and "a bundle copies no links" in err and not (tmp_path / "b2").exists()


def test_check_output_resolves_links_to_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dates.jsonl").write_text("{}\n")
    (tmp_path / "alias").symlink_to(data)
    with pytest.raises(OdloraError, match="lies inside the data input"):
        check_output(tmp_path / "alias" / "out", ADAPTER, inputs={"data": [data]})
    with pytest.raises(OdloraError, match="is not an odlora export"):
        check_output(data, EXPORT, force=True)


def test_a_web_job_never_replaces_an_earlier_runs_adapter(outputs, tmp_path):
    app = WebApp(Runtime.open(outputs["export"]), tmp_path / "work")
    adapter_dir, _ = app.job_outputs("dates")
    shutil.copytree(outputs["dirs"]["a"], adapter_dir)
    with pytest.raises(APIError, match="already holds an adapter named 'dates'") as refused:
        app.start(JobSpec("dates", outputs["data"], steps=1, rank=4, eval_examples=0, task=None))
    assert refused.value.status == 409 and tree(adapter_dir) == tree(outputs["dirs"]["a"])
