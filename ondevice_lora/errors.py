"""The one exception type for bad user input: the CLI prints its message on one line, exits 2."""

from __future__ import annotations

import re
from typing import Callable, Optional

_MARK = "\x1f"  # brackets a parameter's name inside a message (`named`); never in a message otherwise
_NAMED = re.compile(f"{_MARK}([A-Za-z_]+){_MARK}")


def named(param: str) -> str:
    """A parameter mentioned inside a message: "max_seq_len" to a library caller, "--max-seq-len" on the CLI."""
    return f"{_MARK}{param}{_MARK}"


class OdloraError(Exception):
    """A problem with what the user gave us (a path, a file, a parameter), stated in one line.

    An error about one parameter names it (`param="max_seq_len"`): the library's message then reads
    "max_seq_len: 100000 exceeds ...", and the CLI writes the parameter as its flag,
    "--max-seq-len: 100000 exceeds ..." (`for_cli`). Other parameters a message mentions are
    written `named("batch_size")`, and spelled the same way.
    """

    def __init__(self, message: str, param: Optional[str] = None):
        self.param, self.detail = param, message
        super().__init__(self._spelled(lambda name: name))

    def for_cli(self, flags: Optional[dict[str, str]] = None) -> str:
        """The message with each parameter written as its flag: `flags[param]`, else `--param-name`."""
        return self._spelled(lambda name: (flags or {}).get(name, "--" + name.replace("_", "-")))

    def _spelled(self, spell: Callable[[str], str]) -> str:
        text = _NAMED.sub(lambda m: spell(m[1]), self.detail)
        return f"{spell(self.param)}: {text}" if self.param else text


class ContextLengthExceeded(OdloraError):
    """A prompt that leaves no room in the model's context to generate (OpenAI's `context_length_exceeded`)."""
