"""ondevice-lora: on-device personalisation with LoRA.

Train small LoRA adapters on a frozen, quantised base (`odlora personalize`), export the base
once per device runtime with adapter slots (`odlora export`), and swap adapters per request.

The Python API, the same steps as the commands (`import odlora` is this package too):

    from ondevice_lora import PersonalizeConfig, Runtime, export, pack, personalize

    personalize(PersonalizeConfig(), "dates", "adapters/dates")      # the default base, a shipped sample
    export(None, "onnx", "exports/onnx")                             # None: the default base
    pack("adapters/dates", "exports/onnx", "dates.onnx_adapter")
    rt = Runtime.open("exports/onnx")
    rt.register_adapter("dates", "dates.onnx_adapter")
    print(rt.generate("Normalise: March 5th, 2021", adapter="dates").text)

Each name loads its module on first use, so that `import ondevice_lora` (and `odlora --help`)
stays fast. `examples/python_api.py` runs the whole job.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
API = {
    "load_base": "ondevice_lora.base",                 # a base: registered name, HF dir or hub id, .gguf
    "personalize": "ondevice_lora.personalization",    # train an adapter (PEFT format + odlora.json)
    "PersonalizeConfig": "ondevice_lora.config",
    "LoraConfig": "ondevice_lora.config",
    "TrainConfig": "ondevice_lora.config",
    "SamplingConfig": "ondevice_lora.config",
    "load_adapter": "ondevice_lora.adapter",
    "export": "ondevice_lora.exporters.export",        # the base, once per runtime, with adapter slots
    "pack": "ondevice_lora.exporters.export",          # an adapter as the export's native blob
    "Runtime": "ondevice_lora.runtime.engine",         # open an export, register adapters, generate
    "OdloraError": "ondevice_lora.errors",             # bad input, in one line
}
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'ondevice_lora' has no attribute {name!r}")
    return getattr(importlib.import_module(API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
