"""`odlora adapter list|rm` (ondevice_lora/adapter_store.py) and the web page's adapters served
again after a restart.

    python -m pytest -q tests/test_adapter_store.py
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import run_cli  # noqa: E402
from ondevice_lora.atomic import sidecar_of  # noqa: E402
from ondevice_lora.runtime import Runtime  # noqa: E402
from test_runtime import ADAPTERS, make_adapter  # noqa: E402
from test_serve import tiny_export  # noqa: E402,F401  (fixture)


@pytest.fixture
def shelf(tmp_path, tiny_export, tiny_model_factory):
    """A folder holding an adapter directory, a packed adapter and a file of the user's."""
    _, blobs = tiny_export
    root = tmp_path / "shelf"
    make_adapter(tiny_model_factory("llama"), root / "adapters" / "a", *ADAPTERS["a"])
    (root / "packed").mkdir()
    for path in (blobs["b"], sidecar_of(blobs["b"])):
        shutil.copy(path, root / "packed" / path.name)
    (root / "notes.txt").write_text("mine")
    return root


def test_list_finds_both_kinds(shelf, monkeypatch, capsys):
    found = json.loads(run_cli(monkeypatch, capsys, "adapter", "list", shelf, "--json").out)
    assert [(a["kind"], a["rank"]) for a in found] == [("adapter", 4), ("packed onnx", 2)]
    assert found[0]["path"].endswith("adapters/a") and found[1]["base_fingerprint"]
    text = run_cli(monkeypatch, capsys, "adapter", "list", shelf).out
    assert "adapters/a" in text and "b.onnx_adapter" in text and "notes.txt" not in text


def test_rm_removes_adapters_whole_and_nothing_else(shelf, monkeypatch, capsys):
    blob = shelf / "packed" / "b.onnx_adapter"
    refused = run_cli(monkeypatch, capsys, "adapter", "rm", "--yes", shelf / "adapters" / "a", shelf / "notes.txt")
    assert refused.code == 2 and "notes.txt: not an adapter" in refused.err
    assert (shelf / "adapters" / "a").is_dir() and (shelf / "notes.txt").read_text() == "mine"  # checked before any
    assert run_cli(monkeypatch, capsys, "adapter", "rm", shelf / "adapters" / "a").code == 2  # stdin no terminal
    removed = run_cli(monkeypatch, capsys, "adapter", "rm", "-y", shelf / "adapters" / "a", blob)
    assert removed.code == 0, removed.err
    assert sorted(p.name for p in shelf.rglob("*")) == ["adapters", "notes.txt", "packed"]


@pytest.mark.parametrize("which", ["adapters/a", "packed/b.onnx_adapter"])
def test_a_removal_killed_midway_leaves_no_half_adapter(shelf, which):
    """kill -9 after the rename, before the delete: the adapter is gone from its name, whole or not at
    all; the hidden leftover is no adapter to `list`, and the user's other files are untouched."""
    import os
    import subprocess
    import sys

    from ondevice_lora.atomic import KILL_ENV

    env = {**os.environ, KILL_ENV: "removing:1"}
    killed = subprocess.run([sys.executable, "-m", "ondevice_lora", "adapter", "rm", "-y", str(shelf / which)],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (shelf / which).exists() and (shelf / "notes.txt").read_text() == "mine"
    from ondevice_lora.adapter_store import find_adapters

    assert [a["path"] for a in find_adapters([shelf])] == [str(shelf / p) for p in ("adapters/a", "packed/b.onnx_adapter")
                                                           if p != which]


def test_the_web_pages_adapters_are_served_after_a_restart(shelf, tiny_export):
    from ondevice_lora.runtime.openai_schema import APIError
    from ondevice_lora.web.app import JobSpec, WebApp

    export_dir, _ = tiny_export
    (shelf / "packed" / "bad name!.onnx_adapter").write_text("not an id: skipped")
    webapp = WebApp(Runtime.open(export_dir, threads=1), shelf)
    assert sorted(webapp.rt.adapters) == ["b"] and webapp.reloaded[0].startswith("serving b again")
    with pytest.raises(APIError, match="already served"):  # its name stays taken
        webapp.start(JobSpec(name="b", data=shelf / "notes.txt", steps=1, rank=4, eval_examples=0, task=None))
