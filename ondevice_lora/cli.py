"""The `odlora` command line. It only parses flags and calls library functions.

    odlora base pull
    odlora base info --json
    odlora generate --prompt "What is the capital of France?"
"""

from __future__ import annotations

import json
import sys

import click

from .errors import OdloraError
from .registry import DEFAULT_BASE

BASE_HELP = f"A Hugging Face model directory, a .gguf file or a registered name (default: {DEFAULT_BASE})."


def base_option(f):
    return click.option("--base", "base", default=DEFAULT_BASE, show_default=True, help=BASE_HELP)(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ondevice-lora")
def cli():
    """On-device personalisation with LoRA: train adapters on a frozen base, export it once, swap adapters."""


@cli.group()
def base():
    """Fetch and inspect base models."""


@base.command("pull")
@click.argument("name", default=DEFAULT_BASE)
def base_pull(name):
    """Download and convert a registered base (the only command that uses the network).

    Prints the local directory of the converted base.
    """
    from . import registry

    path = registry.pull(name, progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@base.command("info")
@click.argument("base_spec", metavar="BASE", default=DEFAULT_BASE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def base_info(base_spec, as_json):
    """Architecture, parameter count, dtype, fingerprint and size of BASE."""
    from .base import describe_base, load_base

    info = describe_base(load_base(base_spec))
    if as_json:
        click.echo(json.dumps(info))
    else:
        for key, value in info.items():
            click.echo(f"{key:>16}: {value}")


@cli.command()
@base_option
@click.option("--prompt", required=True, help="The user's text.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 means greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--no-chat", is_flag=True, help="Feed the prompt as raw text, without the chat template.")
def generate(base, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, no_chat):
    """Generate a completion for PROMPT; prints only the completion, streamed."""
    from .base import load_base
    from .generate import SamplingConfig, generate_text
    from .prompts import encode_prompt, stop_token_ids

    cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, list(stop))
    cfg.validate()
    loaded = load_base(base)
    ids = encode_prompt(loaded.tokenizer, prompt, chat=not no_chat)
    stream = lambda piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
    generate_text(loaded.model, loaded.tokenizer, ids, cfg, stop_token_ids(loaded.tokenizer, loaded.config), stream)
    sys.stdout.write("\n")


def main():
    try:
        cli.main(standalone_mode=False)
    except OdloraError as e:
        click.echo(f"odlora: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("odlora: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
