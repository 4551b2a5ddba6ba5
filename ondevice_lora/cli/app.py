"""The `odlora` command group, and `main`, which turns errors into one line on stderr and an exit code."""

from __future__ import annotations

import os
import sys

import click

from ..cli_types import click_error_line
from ..errors import OdloraError

# Library errors name a parameter (OdloraError.param); the flag that sets it is `--param-name`, but for these:
FLAGS = {"prompt_format": "--format", "use_rslora": "--rslora", "eval_examples": "--examples", "allow_hosts": "--allow-host", "cors_origins": "--cors-origin",
         "export_dir": "--export", "adapter_dir": "ADAPTER_DIR"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ondevice-lora")
@click.option("-v", "--verbose", is_flag=True, help="Also show the warnings and logs of the libraries underneath "
              "(ExecuTorch, torch, coremltools...), hidden by default.")
def cli(verbose):
    """On-device personalisation with LoRA: train adapters on a frozen base, export it once, swap adapters."""
    if verbose:
        os.environ["ODLORA_VERBOSE"] = "1"  # read by ondevice_lora.quiet, here and in worker processes



def main():
    try:
        cli.main(standalone_mode=False)
    except OdloraError as e:
        click.echo(f"odlora: error: {e.for_cli(FLAGS)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("odlora: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"odlora: error: {click_error_line(e)}", err=True)
        sys.exit(2)

