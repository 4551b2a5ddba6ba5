"""The `odlora` command line. It only parses flags and calls library functions.

    odlora base pull
    odlora demo                                         # all of the below on the shipped sample data
    odlora generate --prompt "What is the capital of France?"
    odlora personalize --data dates.jsonl --out adapters/dates
    odlora generate --adapter adapters/dates --prompt "Normalise: March 5th, 2021"
    odlora export --target onnx --out exports/onnx
    odlora adapter pack adapters/dates --export exports/onnx --out dates.onnx_adapter
    odlora run --export exports/onnx --adapter dates.onnx_adapter --prompt "Normalise: March 5th, 2021"
    odlora serve --export exports/onnx --adapter dates=dates.onnx_adapter      # OpenAI's API on 127.0.0.1:8000
    odlora chat --export exports/onnx --adapter dates=dates.onnx_adapter

    cli/app.py       the command group and main(): a library error becomes one line and exit 2
    cli/options.py   the flags several commands share; defaults come from the configs (config.py)
    cli/models.py    what makes things from a base: base, generate, personalize, adapter, merge, export, demo
    cli/runtime.py   what runs an export: run, serve, chat, bundle, verify
"""

from . import models, runtime  # noqa: F401  (importing them registers their commands on `cli`)
from .app import cli, main

__all__ = ["cli", "main"]
