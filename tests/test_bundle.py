"""Bundles (`odlora bundle`): what an app ships, checked when opened.

    python -m pytest -q tests/test_bundle.py        # a tiny ExecuTorch export, lowered once (~20 s)
"""

from __future__ import annotations

import json
import shutil

import pytest

from ondevice_lora.errors import OdloraError
from ondevice_lora.runtime import Runtime
from ondevice_lora.runtime.bundle import BUNDLE_MANIFEST, open_bundle, write_bundle
from conftest import run_cli
from test_runtime import GREEDY, PROMPT


def edited(bundle, tmp_path, edit) -> "Path":
    """A copy of `bundle` with `edit(copy_dir, manifest)` applied and the manifest written back."""
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / BUNDLE_MANIFEST).read_text())
    edit(copy, manifest)
    (copy / BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_bundle_lists_every_file_and_the_prompt_format(tiny_bundle):
    bundle = open_bundle(tiny_bundle["base"])
    m = bundle.manifest
    assert m["kind"] == "base" and m["target"] == "executorch" and m["format_version"] == 1
    assert {"base/model.pte", "base/model.ptd", "base/manifest.json", "base/tokenizer/tokenizer.json",
            "adapters/a.slots", "adapters/a.slots.json"} <= set(m["files"])
    assert [a["id"] for a in m["adapters"]] == ["a"] and m["adapters"][0]["rank"] == 4
    assert m["prompt"]["stop_ids"] and "chat_prefix" in m["prompt"]
    extra = open_bundle(tiny_bundle["extra"], base=bundle)
    assert extra.manifest["kind"] == "adapters" and not any(f.startswith("base/") for f in extra.manifest["files"])


def test_runtime_from_bundles_answers_like_the_export(tiny_bundle):
    rt = Runtime.open_bundle(tiny_bundle["base"], [tiny_bundle["extra"]], threads=1)
    assert sorted(rt.adapters) == ["a", "b"]
    reference = Runtime.open(tiny_bundle["export"], threads=1)
    for name in ("a", "b"):
        reference.register_adapter(name, tiny_bundle["blobs"][name])
    texts = {}
    for adapter in (None, "a", "b"):
        texts[adapter] = rt.generate(PROMPT, adapter=adapter, sampling=GREEDY).text
        assert texts[adapter] == reference.generate(PROMPT, adapter=adapter, sampling=GREEDY).text
    assert len(set(texts.values())) == 3


def _drop_file(copy, m):
    (copy / "base" / "model.ptd").unlink()


def _flip_byte(copy, m):
    blob = copy / "adapters" / "a.slots"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))


def _traversal(copy, m):
    m["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}


def _absolute(copy, m):
    m["adapters"][0]["file"] = "/etc/passwd"


def _version(copy, m):
    m["format_version"] = 99


def _fingerprint(copy, m):
    m["base_fingerprint"] = "sha256:" + "0" * 64


def _blend_id(copy, m):
    m["adapters"][0]["id"] = "a:b"  # a request could not name it: ':' writes a blend


# (edit, what the error says): every runtime refuses these the same way (see also test_native.py)
BAD_BUNDLES = [
    (_drop_file, "file base/model.ptd listed in bundle.json is missing"),
    (_flip_byte, "file adapters/a.slots does not match its sha256"),
    (_traversal, "path '../outside.txt' leaves the bundle"),
    (_absolute, "path '/etc/passwd' leaves the bundle"),
    (_version, "unknown bundle format version 99"),
    (_fingerprint, "fingerprint differs"),
    (_blend_id, "adapter id 'a:b'"),
]


@pytest.mark.parametrize("edit,message", BAD_BUNDLES)
def test_bad_base_bundles_are_refused(tiny_bundle, tmp_path, edit, message):
    bad = edited(tiny_bundle["base"], tmp_path, edit)
    with pytest.raises(OdloraError, match=message.replace("(", r"\(")):
        open_bundle(bad)


def test_a_link_out_of_the_bundle_is_refused(tiny_bundle, tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("x")

    def link(copy, m):
        (copy / "adapters" / "evil").symlink_to(outside)
        m["files"]["adapters/evil"] = {"sha256": "0" * 64, "size": 1}

    with pytest.raises(OdloraError, match="leaves the bundle \\(through a link\\)"):
        open_bundle(edited(tiny_bundle["base"], tmp_path, link))


def test_adapter_bundle_for_another_base_is_refused(tiny_bundle, tmp_path):
    other = edited(tiny_bundle["extra"], tmp_path, lambda c, m: m.update(base_fingerprint="sha256:" + "1" * 64))
    base = open_bundle(tiny_bundle["base"])
    with pytest.raises(OdloraError, match="packed for a different base"):
        open_bundle(other, base=base)
    with pytest.raises(OdloraError, match="packed for a different base"):
        Runtime.open_bundle(tiny_bundle["base"], [other])


def test_write_refuses_bad_input_and_never_clobbers(tiny_bundle, tmp_path):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("good")
    with pytest.raises(OdloraError, match="exists and is not an odlora bundle"):
        write_bundle(tiny_bundle["export"], [], user_dir, force=True)
    assert [p.name for p in user_dir.iterdir()] == ["keep.txt"]
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle["extra"], out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OdloraError, match="already exists"):
        write_bundle(tiny_bundle["export"], [], out)
    with pytest.raises(OdloraError, match="no sidecar"):
        bare = tmp_path / "bare.slots"
        shutil.copyfile(tiny_bundle["blobs"]["a"], bare)
        write_bundle(tiny_bundle["export"], [("a", bare)], out, force=True)
    with pytest.raises(OdloraError, match="adapter id '../x'"):
        write_bundle(tiny_bundle["export"], [("../x", tiny_bundle["blobs"]["a"])], out, force=True)
    with pytest.raises(OdloraError, match="needs at least one adapter$"):
        write_bundle(tiny_bundle["export"], [], out, with_base=False, force=True)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_bundle_verify_and_run(tiny_bundle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli-bundle"
    code, stdout, err = run_cli(monkeypatch, capsys, "bundle", "--export", tiny_bundle["export"], "--adapter",
                                f"b={tiny_bundle['blobs']['b']}", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["adapters"] == ["b"]
    code, stdout, err = run_cli(monkeypatch, capsys, "verify", out)
    assert code == 0 and "ok (base bundle, executorch" in stdout, err
    code, stdout, err = run_cli(monkeypatch, capsys, "verify", tiny_bundle["extra"], "--base", out)
    assert code == 0, err
    code, stdout, err = run_cli(monkeypatch, capsys, "run", "--export", out, "--adapter", "b", "--prompt", PROMPT,
                                "--max-new-tokens", 10)
    # `run --adapter` takes files; a bundle's adapters are registered by id and named in requests
    assert code == 2 and "no such packed adapter" in err
    bad = edited(out, tmp_path / "bad", lambda c, m: m.update(format_version=2))
    code, _, err = run_cli(monkeypatch, capsys, "verify", bad)
    assert code == 2 and err.startswith("odlora: error: ") and "unknown bundle format version 2" in err
