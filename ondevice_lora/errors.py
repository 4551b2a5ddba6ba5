"""The one exception type for bad user input: the CLI prints its message on one line, exits 2."""

from __future__ import annotations

from typing import Optional


class OdloraError(Exception):
    """A problem with what the user gave us (a path, a file, a parameter), stated in one line.

    An error about one parameter names it (`param="max_seq_len"`): the library's message then reads
    "max_seq_len: 100000 exceeds ...", and the CLI writes the parameter as its flag,
    "--max-seq-len: 100000 exceeds ..." (`for_cli`).
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.detail = param, message

    def for_cli(self, flags: Optional[dict[str, str]] = None) -> str:
        """The message with the parameter written as its flag: `flags[param]`, else `--param-name`."""
        if not self.param:
            return str(self)
        flag = (flags or {}).get(self.param, "--" + self.param.replace("_", "-"))
        return f"{flag}: {self.detail}"
