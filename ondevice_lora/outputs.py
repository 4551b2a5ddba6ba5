"""What each command may write over: never what the user owns.

    check_output(out, ADAPTER, force, inputs={"data": [data], "base": [base_path]})
    with staged_output(out, ADAPTER) as tmp:
        write files into tmp                   # swapped in crash-safely (atomic.py)

A command refuses an `--out` that

- is, contains or lies inside one of its inputs (paths resolved, symbolic links included);
- is a symbolic link (replacing it would replace the link, not what it points to);
- exists and is not the command's own kind of output, recognised by its marker file(s):
  an empty directory is nothing to lose and is taken;
- is its own kind, unless `force` (personalize: or `--resume`).

Each refusal is one line that names the path (`odlora: error: --out PATH: ...`, exit 2).
`staged_output` checks the kind once more just before it writes, so that no library caller can
write over what is not its own either.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

from .atomic import sidecar_of, staged_dir, staged_pair
from .errors import OdloraError, named

OUT = named("out")  # the output path, as its messages name it (--out on the CLI)

MODEL_MARKER = "odlora-model.json"  # what `odlora merge` (and a converted base) adds to a Hugging Face directory


def _json_format(path: Path) -> Optional[str]:
    """The `format` field of a JSON file, None when it is not one of ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _has(*names: str) -> Callable[[Path], bool]:
    return lambda path: path.is_dir() and all((path / name).is_file() for name in names)


@dataclass(frozen=True)
class Kind:
    """One kind of output and how to recognise it on disk."""

    what: str  # "an adapter directory"
    marker: str  # the marker, as the refusal names it
    matches: Callable[[Path], bool]
    paired: bool = False  # a file with its `<file>.json` sidecar (a packed adapter)


ADAPTER = Kind("an adapter directory", "adapter_config.json + odlora.json", _has("adapter_config.json", "odlora.json"))
EXPORT = Kind("an odlora export", "manifest.json of format odlora-export",
              lambda p: p.is_dir() and _json_format(p / "manifest.json") == "odlora-export")
BUNDLE = Kind("an odlora bundle", "bundle.json of format odlora-bundle",
              lambda p: p.is_dir() and _json_format(p / "bundle.json") == "odlora-bundle")
MODEL = Kind("an odlora model directory", f"config.json + model.safetensors + {MODEL_MARKER}",
             lambda p: _has("config.json", "model.safetensors")(p) and _json_format(p / MODEL_MARKER) == "odlora-model")
PACKED = Kind("a packed adapter", "a blob with its .json sidecar of format odlora-packed-adapter",
              lambda p: not p.is_dir() and _json_format(sidecar_of(p)) == "odlora-packed-adapter", paired=True)
CHECKPOINT = Kind("a training checkpoint", "state.json + state.safetensors", _has("state.json", "state.safetensors"))


def _relation(out: Path, source: Path) -> Optional[str]:
    """How `out` overlaps an input: "is", "lies inside", "contains", or None."""
    try:
        o, s = out.resolve(), Path(source).expanduser().resolve()
    except (OSError, RuntimeError):  # a link loop: it cannot be the input either
        return None
    if o == s:
        return "is"
    if o.is_relative_to(s):
        return "lies inside"
    if s.is_relative_to(o):
        return "contains"
    return None


def _taken(out: Path, kind: Kind) -> list[Path]:
    """The paths of `out` that already exist (a packed adapter is two files)."""
    paths = [out, sidecar_of(out)] if kind.paired else [out]
    return [p for p in paths if os.path.lexists(p)]


def check_kind(out: Path, kind: Kind) -> bool:
    """True when `out` holds a previous output of `kind`, False when nothing (or an empty
    directory) is there; refuses anything else."""
    taken = _taken(out, kind)
    if any(p.is_symlink() for p in taken):
        raise OdloraError(f"{OUT} {out}: is a symbolic link; give the path it points to, or another path")
    if kind.paired and out.is_dir():
        raise OdloraError(f"{OUT} {out}: is a directory; give the file to write, e.g. {out}/NAME")
    if not taken or (taken == [out] and out.is_dir() and not any(out.iterdir())):
        return False
    if not kind.matches(out):
        raise OdloraError(f"{OUT} {out}: exists and is not {kind.what} (no {kind.marker}); "
                          f"refusing to replace it: choose another path")
    return True


def check_output(out: Path, kind: Kind, force: bool = False,
                 inputs: Optional[Mapping[str, Iterable[Optional[Path]]]] = None) -> Path:
    """Refuse an `out` the command must not write (module docstring); returns it as a Path.

    inputs: what the command reads, by the parameter that named it ({"data": [path]}; the CLI
    prints it as its flag or argument); None entries are skipped.
    """
    out = Path(out)
    for param, paths in (inputs or {}).items():
        for source in paths:
            if source is not None and (relation := _relation(out, Path(source))):
                raise OdloraError(f"{OUT} {out}: {relation} the {named(param)} input {source}; write somewhere else")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OdloraError(f"{OUT} {out}: {parent} is not a directory")
            break
    if check_kind(out, kind) and not force:
        raise OdloraError(f"{OUT} {out}: {kind.what} already exists (use {named('force')} to replace it)")
    return out


@contextmanager
def staged_output(out: Path, kind: Kind) -> Iterator[Path]:
    """`atomic.staged_dir` for an output of `kind`, after checking it replaces only its own kind."""
    check_kind(Path(out), kind)
    with staged_dir(out) as tmp:
        yield tmp


@contextmanager
def staged_packed(out: Path) -> Iterator[tuple[Path, Path]]:
    """`atomic.staged_pair` for a packed adapter: (blob, sidecar) to write, committed together."""
    check_kind(Path(out), PACKED)
    with staged_pair(Path(out)) as pair:
        yield pair
