"""The one exception type for bad user input: the CLI prints its message on one line, exits 2."""

from __future__ import annotations

from typing import Optional


class OdloraError(Exception):
    """A problem with what the user gave us (a path, a file, a parameter), stated in one line.

    An error about one parameter names it (`param="max_seq_len"`): the library's message then reads
    "max_seq_len 100000 exceeds ...", and the CLI's "--max-seq-len 100000 exceeds ..." (`for_cli`).
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(f"{param} {message}" if param else message)
        self.param, self.detail = param, message

    def for_cli(self) -> str:
        """The message with the parameter written as its command-line flag."""
        return f"--{self.param.replace('_', '-')} {self.detail}" if self.param else str(self)
