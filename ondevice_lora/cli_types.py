"""The click parameter types of the `odlora` command line: each checks its flag as click parses
it, before the command runs, and fails in the one line that `cli.main` prints.

    @click.option("--lr", type=Bounded(bounds.LR))        # a number in its range (bounds.py)
    @click.option("--adapter", type=WeightedPath())       # DIR[:WEIGHT] -> (DIR, weight)
    @click.option("--prompt", type=Utf8Text())            # text the tokenizer can encode
"""

from __future__ import annotations

from pathlib import Path

import click

from . import bounds


class Bounded(click.ParamType):
    """A number flag parsed and checked against its bound (bounds.py) as click reads it, before
    the command runs: `--seed 1e23` and `--lr nan` fail here, in one line naming the flag.
    The library configs' validate() check the same bounds for callers that are not the CLI."""

    def __init__(self, bound: bounds.Bound):
        self.bound = bound
        self.name = "integer" if bound.integer else "number"

    def convert(self, value, param, ctx):
        number = value if isinstance(value, (int, float)) else self.parse(value, param, ctx)
        problem = self.bound.problem(number)
        if problem:
            self.fail(problem, param, ctx)
        return number

    def parse(self, text: str, param, ctx):
        try:
            return int(text) if self.bound.integer else float(text)
        except ValueError:
            self.fail(f"{text!r} is not {'an integer' if self.bound.integer else 'a number'}", param, ctx)


class WeightedPath(click.ParamType):
    """`PATH` or `PATH:WEIGHT` (the adapter's strength in a blend) as (PATH, weight). A suffix that
    is no number belongs to the path; one that is must be finite (`:nan` blended NaN weights)."""

    name = "path[:weight]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        path, _, suffix = value.rpartition(":")
        try:
            weight = float(suffix)
        except ValueError:
            return value, 1.0
        if not path:
            return value, 1.0
        problem = bounds.ADAPTER_WEIGHT.problem(weight)
        if problem:
            self.fail(f"{value!r}: the weight {problem}", param, ctx)
        return path, weight


class Utf8Text(click.ParamType):
    """Text for the model. Python hands over argv bytes that are not UTF-8 as lone surrogates
    (PEP 383), which the tokenizer cannot encode: refuse them here, naming the byte."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(value[e.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
            self.fail(f"not valid UTF-8 (byte 0x{byte:02x} at character {e.start})", param, ctx)
        return value


EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)  # an export, bundle or program


def click_error_line(e: click.ClickException) -> str:
    """Click's error in our one-line form, flag first, without click's usage banner:
    `--seed: '1e23' is not an integer (see `odlora generate --help`)`."""
    param = getattr(e, "param", None)
    if isinstance(e, click.BadParameter) and param is not None and not isinstance(e, click.MissingParameter):
        name = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
        text = f"{name}: {e.message}"
    else:
        text = e.format_message()
    ctx = getattr(e, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if isinstance(e, click.UsageError) and ctx is not None else ""
    return " ".join(text.split()) + hint
