"""Hugging Face model ids as bases, read from a cache laid out as huggingface_hub lays it out
(models--OWNER--NAME/{blobs,refs,snapshots}), offline; `base list`; the hub id in PEFT's config.

    python -m pytest -q tests/test_hub.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from conftest import run_cli
from ondevice_lora.adapter import peft_config
from ondevice_lora.base import load_base
from ondevice_lora.registry import DEFAULT_BASE, REGISTRY

REPO = "acme/tiny-llama"


def hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """`files` as the hub caches a snapshot of `repo_id`: content-addressed blobs, the main ref,
    and the snapshot's relative symlinks to the blobs."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    for file in files.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        (snapshot / file.name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_model_factory):
    root = tmp_path / "hub"
    hub_cache(root, REPO, tiny_model_factory("llama"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network in a test
    return root


def test_a_hub_id_loads_from_the_cache(cache, tiny_model_factory):
    from_hub, from_dir = load_base(REPO), load_base(str(tiny_model_factory("llama")))
    assert from_hub.fingerprint == from_dir.fingerprint and from_hub.spec == REPO
    assert from_hub.path.parent.name == "snapshots"


def test_a_hub_id_not_in_the_cache_says_how_to_get_it(cache, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "base", "info", "acme/absent")
    assert result.code == 2 and "`odlora base pull acme/absent`" in result.err and "Traceback" not in result.err
    offline = run_cli(monkeypatch, capsys, "base", "pull", "acme/absent")  # offline: a line, no traceback
    assert offline.code == 2 and offline.err.splitlines()[-1].startswith("odlora: error: acme/absent: cannot download it")


def test_base_list_shows_registered_and_cached_bases(cache, monkeypatch, capsys):
    (cache / "models--acme--not-a-model").mkdir()  # a half-written repo folder is skipped
    rows = json.loads(run_cli(monkeypatch, capsys, "base", "list", "--json").out)
    assert [(r["base"], r["kind"]) for r in rows] == [(DEFAULT_BASE, "registered"), (REPO, "hugging face cache")]
    assert rows[1]["pulled"] and rows[1]["about"].startswith("llama, ")
    text = run_cli(monkeypatch, capsys, "base", "list").out
    assert REPO in text and DEFAULT_BASE in text


def test_peft_config_names_the_hub_id(cache):
    from ondevice_lora.adapter import Adapter
    from ondevice_lora.config import LoraConfig

    adapter = Adapter(A={}, B={}, scalings={}, config=LoraConfig(rank=4), meta={})
    assert peft_config(adapter, DEFAULT_BASE)["base_model_name_or_path"] == REGISTRY[DEFAULT_BASE].hub_id
    assert peft_config(adapter, REPO)["base_model_name_or_path"] == REPO
