"""Hugging Face model ids as bases: `HuggingFaceTB/SmolLM2-135M-Instruct` is read from
huggingface_hub's own local cache (where `huggingface-cli download`, transformers and every other hub
client put it; `HF_HUB_CACHE` / `HF_HOME` move it), without the network. Only `odlora base pull ID`
downloads, and only the files a base needs (config, safetensors weights, tokenizer): never pickled
`.bin` weights, never code.

    snapshot = cached_snapshot("HuggingFaceTB/SmolLM2-135M-Instruct")   # a directory, or None
    download("HuggingFaceTB/SmolLM2-135M-Instruct")                     # `odlora base pull ID`
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .errors import OdloraError

# `owner/name` as the hub spells them (letters, digits, - _ .; no leading dot, no `..`).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# What a base is made of; a repository's other files (pickles, ONNX, GGUF, images) stay on the hub.
BASE_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json"]


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.fullmatch(spec)) and ".." not in spec


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot of `repo_id`'s main revision, if the cache holds one with a config.json."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=BASE_FILES))
    except LocalEntryNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


def download(repo_id: str) -> Path:
    """Fetch a base's files into the hub's cache (the network); returns the snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=BASE_FILES))
    except RepositoryNotFoundError:
        raise OdloraError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: log in with "
                          f"`hf auth login`)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise OdloraError(f"{repo_id}: cannot download it ({type(e).__name__}: {e})") from None
    if not (path / "config.json").is_file():
        raise OdloraError(f"{repo_id}: the repository has no config.json: not a Transformers model")
    return path


def cached_models() -> list[dict]:
    """Every model repository in the hub's cache that has a snapshot with a config.json: its id,
    directory and size on disk."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        snapshot = cached_snapshot(repo.repo_id) if repo.repo_type == "model" else None
        if snapshot is not None:
            models.append({"id": repo.repo_id, "path": str(snapshot), "bytes": repo.size_on_disk})
    return models
