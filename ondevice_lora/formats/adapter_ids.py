"""What an adapter may be called: one rule for the runtime, the server, the CLI, bundles and the web app.

An id is what a request names (`"model": "dates"`, a blend `"dates:0.7+contacts:0.3"`), the name
of the adapter's file inside a bundle, and the name of a web-demo job's output, so it is safe in
all three: 1-64 of letters, digits, `_`, `-` and `.`, starting with a letter or digit (so never
`..`, a path, `:` or `+`), and not `base`, which names the model without adapters. The C++ engine
(runtime/native/src/engine.cpp) holds ids to the same pattern.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import OdloraError

PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
BASE = "base"  # the model without adapters
RULE = (f"use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit, and not `{BASE}` "
        f"(`{BASE}` names the model without adapters; ':' and '+' write blends)")


def is_adapter_id(name) -> bool:
    return isinstance(name, str) and name != BASE and re.fullmatch(PATTERN, name) is not None


def check_adapter_id(name) -> str:
    """`name`, or an OdloraError that names it and says the rule."""
    if not is_adapter_id(name):
        raise OdloraError(f"adapter id {name!r}: {RULE}")
    return name


def adapter_id_from(blob: Path) -> str:
    """The id a packed blob gets when none is given: its file name without the suffix (`dates.onnx_adapter` -> `dates`)."""
    return Path(blob).stem
