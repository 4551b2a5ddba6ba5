"""Bundles: what a mobile app ships, and what it downloads later.

    odlora bundle --export exports/executorch --adapter dates=dates.slots --out app-bundle
    odlora bundle --export exports/executorch --adapter notes=notes.slots --no-base --out notes-bundle

A base bundle is a directory an app copies into its assets:

    bundle.json                 the bundle manifest (below)
    base/                       the export: its manifest.json and the files it lists (program, weights,
                                tokenizer/), regular files only, nothing else of the export directory
    adapters/<id><suffix>       packed adapters (`odlora adapter pack`), each with its sidecar .json

An adapter bundle (`--no-base`) holds only `adapters/`: it is downloaded later and checked against
the installed base bundle (same format, target, base fingerprint and slot layout).

bundle.json: `format` "odlora-bundle", `format_version`, `kind` ("base" | "adapters"), `target`,
`delegate` (ExecuTorch bundles: the delegate the program is lowered to, which the app must link), `base_fingerprint`, `slots` (the export's slot spec), `max_seq_len`, `prompt` (the chat template
rendered around one user message as `chat_prefix` / `chat_suffix`, and `stop_ids`, so that a
runtime without a template engine builds the same prompt), `adapters` ([{id, file, rank, metrics,
prompt_format}]; prompt_format "chat" wraps a request in chat_prefix/chat_suffix, "raw" feeds it as is),
and `files` ({relative path: {sha256, size}} for every other file). Opening a bundle checks all of it:
an unknown format version, a path that leaves the bundle, a missing or changed file, or an adapter
bundle for another base is an error that names what is wrong. The native runtime
(`runtime/native`) applies the same checks to the same file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import __version__
from ..atomic import pair_sidecar
from ..base import load_tokenizer
from ..errors import OdloraError, named
from ..outputs import BUNDLE, check_output, staged_output
from ..prompts import DEFAULT_PROMPT_FORMAT, has_chat_template, render_chat, stop_token_ids
from ..formats.adapter_ids import check_adapter_id
from ..formats.manifest import MANIFEST, file_table, read_manifest, sha256_file
from ..formats.schemas import BundleManifest, read_json, to_dict
from .adapters import read_sidecar

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT, BUNDLE_VERSION = BundleManifest.FORMAT, BundleManifest.VERSION
BASE_DIR, ADAPTERS_DIR = "base", "adapters"
_MESSAGE = "\x00odlora-message\x00"  # stands for the user's text when the chat template is rendered


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def base_dir(self) -> Path:
        if self.manifest["kind"] != "base":
            raise OdloraError(f"{self.path}: an adapter bundle has no base; open the app's base bundle")
        return self.path / BASE_DIR

    def adapter_files(self) -> dict[str, Path]:
        """Adapter id -> its packed blob inside the bundle."""
        return {a["id"]: self.path / a["file"] for a in self.manifest["adapters"]}


# -- writing --------------------------------------------------------------------------------------

def write_bundle(export_dir: Path, adapters: list[tuple[str, Path]], out: Path, with_base: bool = True,
                 force: bool = False) -> dict:
    """Bundle an export (unless `with_base` is False) and packed adapters [(id, blob)]; returns bundle.json.
    Replaces a previous bundle at `out` only with `force`, never an input or anything else."""
    export_dir = Path(export_dir)
    out = check_output(out, BUNDLE, force, {"export_dir": [export_dir], "adapter": [Path(b) for _, b in adapters]})
    if not with_base and not adapters:
        raise OdloraError(f"an adapter bundle (no base) needs at least one {named('adapter')}")
    export = read_manifest(export_dir, verify=True)
    ids = [adapter_id for adapter_id, _ in adapters]
    if len(set(ids)) != len(ids):
        raise OdloraError(f"adapter ids must be unique, got {ids}")
    with staged_output(out, BUNDLE) as tmp:
        if with_base:
            copy_export(export_dir, export, tmp / BASE_DIR)
        (tmp / ADAPTERS_DIR).mkdir()
        entries = [copy_adapter(adapter_id, Path(blob), export, tmp) for adapter_id, blob in adapters]
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "tool_version": __version__,
            "kind": "base" if with_base else "adapters", "target": export["target"],
            **({"delegate": export["executorch"].get("backend", "xnnpack")} if export["target"] == "executorch" else {}),
            "base_fingerprint": export["base_fingerprint"], "slots": export["slots"],
            "max_seq_len": export["max_seq_len"], "prompt": prompt_template(export_dir, export),
            "adapters": entries, "files": file_table(tmp, BUNDLE_MANIFEST),
        }
        (tmp / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def copy_export(export_dir: Path, export: dict, into: Path) -> None:
    """The export's manifest and the files it lists, as regular files that stay inside the export
    (whatever else lies in the directory, and where its links lead, stays out of the bundle)."""
    root = export_dir.resolve()
    for name in [MANIFEST, *export["files"]]:
        source = export_dir / name
        if source.is_symlink() or not source.resolve().is_relative_to(root) or not source.is_file():
            raise OdloraError(f"{export_dir}: {name} is not a regular file inside the export; a bundle copies no links")
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, into / name)


def copy_adapter(adapter_id: str, blob: Path, export: dict, into: Path) -> dict:
    check_adapter_id(adapter_id)
    info = read_sidecar(blob, export)  # packed for this export's target and base, checksum intact
    name = f"{ADAPTERS_DIR}/{adapter_id}{''.join(blob.suffixes) or '.bin'}"
    shutil.copyfile(blob, into / name)
    shutil.copyfile(pair_sidecar(blob), into / f"{name}.json")
    return {"id": adapter_id, "file": name, "rank": info.get("rank"), "metrics": info.get("metrics", {}),
            "prompt_format": info.get("prompt_format", DEFAULT_PROMPT_FORMAT)}


def prompt_template(export_dir: Path, export: dict) -> dict:
    """The chat template around one user message, and the stop ids, as plain strings and numbers."""
    tokenizer = load_tokenizer(export_dir / "tokenizer")
    prefix, suffix = "", ""
    if has_chat_template(tokenizer):
        rendered = render_chat(tokenizer, [{"role": "user", "content": _MESSAGE}], add_generation_prompt=True)
        prefix, _, suffix = rendered.partition(_MESSAGE)
    return {"chat_prefix": prefix, "chat_suffix": suffix,
            "stop_ids": sorted(stop_token_ids(tokenizer, export.get("config") or {}))}


# -- reading --------------------------------------------------------------------------------------

def open_bundle(path: Path, base: Optional[Bundle] = None) -> Bundle:
    """Read and verify a bundle: format, paths, every file's size and sha256, and for an adapter
    bundle that `base` (the installed base bundle) is the base its adapters were packed for."""
    path = Path(path)
    manifest_path = path / BUNDLE_MANIFEST
    try:
        manifest = to_dict(read_json(manifest_path, BundleManifest))  # types, paths inside, format version
    except FileNotFoundError:
        raise OdloraError(f"{path}: not an odlora bundle (no {BUNDLE_MANIFEST})") from None
    verify_files(path, manifest["files"])
    for adapter in manifest["adapters"]:  # (their ids were checked with the schema)
        if adapter["file"] not in manifest["files"]:
            raise OdloraError(f"{manifest_path}: adapter {adapter['id']!r} file {adapter['file']} is not listed in files")
    bundle = Bundle(path, manifest)
    if manifest["kind"] == "base":
        export = read_manifest(path / BASE_DIR, verify=False)  # its files were checked above
        if export["base_fingerprint"] != manifest["base_fingerprint"]:
            raise OdloraError(f"{path}: base/manifest.json's fingerprint differs from bundle.json's")
    elif base is not None:
        check_same_base(bundle, base)
    return bundle


def verify_files(root: Path, files: dict) -> None:
    for name, entry in files.items():
        f = safe_relative(root, name)
        if not f.is_file():
            raise OdloraError(f"{root}: file {name} listed in {BUNDLE_MANIFEST} is missing")
        if f.stat().st_size != entry["size"] or sha256_file(f) != entry["sha256"]:
            raise OdloraError(f"{root}: file {name} does not match its sha256 in {BUNDLE_MANIFEST} (corrupt or changed)")


def safe_relative(root: Path, name: str) -> Path:
    """root/name, refusing links that lead out of the bundle (the schema refused absolute paths and `..`)."""
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise OdloraError(f"{root / BUNDLE_MANIFEST}: path {name!r} leaves the bundle (through a link)")
    return root / name


def check_same_base(adapters: Bundle, base: Bundle) -> None:
    mine, theirs = adapters.manifest, base.manifest
    for field, what in (("base_fingerprint", "base"), ("target", "runtime target"), ("slots", "adapter slots")):
        if mine[field] != theirs[field]:
            raise OdloraError(f"{adapters.path}: packed for a different {what} than the installed bundle {base.path} "
                              f"({field} differs); bundle the adapters against the app's export")
