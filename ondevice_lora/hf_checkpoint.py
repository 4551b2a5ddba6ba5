"""Read and write Hugging Face model directories: config.json, safetensors weights, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import OdloraError
from .outputs import MODEL, MODEL_MARKER, staged_output
from .formats.schemas import HFConfig, SafetensorsIndex, read_json, to_dict


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise OdloraError(f"{path}: no such directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OdloraError(f"{path}: no config.json (not a Hugging Face model directory)")
    return to_dict(read_json(config_file, HFConfig))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, single-file or sharded (with index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, SafetensorsIndex).weight_map.values()))
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise OdloraError(f"{index}: shard {missing[0]} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OdloraError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise OdloraError(f"{f}: corrupt safetensors file ({e})") from None
    return tensors


def write_model_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer,
                    origin: Optional[dict] = None, generation_config: Optional[dict] = None) -> None:
    """Write a complete model directory atomically: build it beside `out`, then swap it in.
    `odlora-model.json` marks it as ours (and says what it was made from, `origin`), so that a
    later write may replace it, and nothing else, with --force."""
    with staged_output(out, MODEL) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        marker = {"format": "odlora-model", "tool_version": __version__, **(origin or {})}
        (tmp / MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
