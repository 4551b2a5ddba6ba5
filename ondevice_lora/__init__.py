"""ondevice-lora: on-device personalisation with LoRA.

Train small LoRA adapters on a frozen, quantised base (`odlora personalize`), export the base
once per device runtime with adapter slots (`odlora export`), and swap adapters per request.
"""

__version__ = "0.1.0"
