"""The flags several commands share, and `setting`: a flag whose default is its config's (config.py)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import click

from .. import bounds
from ..cli_types import EXISTING_DIR, Bounded, Utf8Text
from ..config import SamplingConfig, default_of
from ..errors import OdloraError
from ..formats.targets import TARGETS
from ..prompts import format_mismatch
from ..registry import DEFAULT_BASE


def setting(flag: str, config: type, name: Optional[str] = None, help: str = "", **kwargs):
    """`--flag` for the field `name` (default: the flag's name) of a config dataclass. Unset, it is
    None and leaves the config's own default in force, which `--help` shows; so a default lives in
    config.py alone and a command passes on only what the user said (`given`)."""
    name = name or flag.lstrip("-").replace("-", "_")
    default = default_of(config, name)
    shown = f"[default: {default}]" if default is not None else ""
    return click.option(flag, name, default=None, help="  ".join(part for part in (help, shown) if part), **kwargs)


def config_file_option(f):
    """`--config FILE`: a command's options from a TOML or YAML file, the command line overriding
    it. Keys are the options' names without `--` (`rank`, `batch-size` or `batch_size`, `format`)."""
    def load(ctx: click.Context, param, path: Optional[Path]):
        if path is not None:
            ctx.default_map = {**(ctx.default_map or {}), **read_option_file(path, ctx.command)}

    return click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
                        expose_value=False, callback=load, metavar="FILE",
                        help="Read options from a TOML or YAML file (keys: the option names, e.g. rank = 16); "
                             "options on the command line override it.")(f)


def read_option_file(path: Path, command: click.Command) -> dict:
    """{parameter name: value} from a TOML (.toml) or YAML (.yaml, .yml) file of `command`'s options."""
    from ..user_files import read_regular_file

    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise OdloraError(f"{path}: a config file is .toml, .yaml or .yml", param="config")
    try:
        values = parse_option_file(path, read_regular_file(path, 2**20).decode("utf-8"))
    except ValueError as e:  # not UTF-8, TOML's or YAML's syntax
        raise OdloraError(f"{path}: {' '.join(str(e).split())}", param="config") from None
    if not isinstance(values, dict):
        raise OdloraError(f"{path}: expected a table of option = value", param="config")
    names = {opt.lstrip("-"): p.name for p in command.params for opt in p.opts if opt.startswith("--")}
    out = {}
    for key, value in values.items():
        name = names.get(str(key).lstrip("-").replace("_", "-"))
        if name is None or name == "config_file":
            raise OdloraError(f"{path}: {key!r} is not an option of this command (see --help)", param="config")
        out[name] = value
    return out


def parse_option_file(path: Path, text: str):
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}  # safe_load: plain data only, never objects or code
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def given(**values) -> dict:
    """The settings the user gave (not None), to build a config with."""
    return {name: value for name, value in values.items() if value is not None}


BASE_HELP = "A Hugging Face model directory, a .gguf file or a registered name."


def base_option(f):
    return click.option("--base", "base", default=DEFAULT_BASE, show_default=True, help=BASE_HELP)(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on the last line.")(f)


def sampling_options(f):
    """The generation flags shared by `generate`, `run` and `chat`, handed to the command as one
    checked `sampling` (a SamplingConfig), so that bad values fail before anything loads."""
    options = [
        setting("--max-new-tokens", SamplingConfig, type=Bounded(bounds.POSITIVE_INT)),
        setting("--temperature", SamplingConfig, type=Bounded(bounds.TEMPERATURE), help="0 means greedy; at most 2."),
        setting("--top-k", SamplingConfig, type=Bounded(bounds.NON_NEGATIVE_INT),
                help="Sample from the k most likely tokens (0: all)."),
        setting("--top-p", SamplingConfig, type=Bounded(bounds.TOP_P), help="Nucleus sampling mass."),
        setting("--seed", SamplingConfig, type=Bounded(bounds.SEED), help="Seed for sampling (same seed, same text)."),
        click.option("--stop", multiple=True, type=Utf8Text(), help="Stop when this text appears (repeatable)."),
    ]

    @functools.wraps(f)
    def command(*args, max_new_tokens, temperature, top_k, top_p, seed, stop, **kwargs):
        sampling = SamplingConfig(**given(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed), stop=list(stop))
        sampling.validate()
        return f(*args, sampling=sampling, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def chat_option(f):
    return click.option("--chat/--no-chat", "chat", default=None,
                        help="Wrap the prompt in the chat template, or feed it as raw text (default: the way the "
                             "adapter was trained, `personalize --format`; the chat template for the base).")(f)


def asks_chat(trained: str, chat: Optional[bool], adapter_name: str) -> bool:
    """Whether to use the chat template: as the adapter was trained unless --chat/--no-chat says
    otherwise, which then gets a one-line warning on stderr."""
    asked = trained if chat is None else ("chat" if chat else "raw")
    warning = format_mismatch(adapter_name, trained, asked)
    if warning:
        click.echo(f"odlora: warning: {warning}", err=True)
    return asked == "chat"


def export_option(f):
    return click.option("--export", "export_dir", required=True, type=EXISTING_DIR,
                        help="An `odlora export` directory, or an app bundle (`odlora bundle`) with its adapters.")(f)


def backend_option(f):
    return click.option("--backend", default=None, type=click.Choice([*TARGETS, "torch"]),
                        help="Default: the export's target; torch runs the PyTorch reference of the exported graph.")(f)


def named_adapters_option(f):
    """`--adapter [ID=]FILE` for the commands that serve several adapters by id (`serve`, `chat`)."""
    return click.option("--adapter", "adapters", multiple=True, metavar="[ID=]FILE",
                        help="Packed adapter blob (`odlora adapter pack`) offered as ID (default: the file's stem); "
                             "repeatable.")(f)


def write_stdout(piece: str) -> None:
    """Stream generated text as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def print_fields(info: dict) -> None:
    for key, value in info.items():
        click.echo(f"{key:>22}: {value}")


def load_weighted_adapters(specs, fingerprint: str):
    """Load (DIR, weight) adapters (`--adapter DIR[:W]`), check each against the base, and blend them into one."""
    from ..adapter import blend, check_base, load_adapter

    weighted = []
    for path, weight in specs:
        adapter = load_adapter(Path(path))
        check_base(adapter, fingerprint, path)
        weighted.append((adapter, weight))
    return blend(weighted)
