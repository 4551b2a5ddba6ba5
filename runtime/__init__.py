"""What runs on the device (installed as `ondevice_lora.runtime`): the Python runtime over the
exported base, with per-request adapters. See `engine.py`; `server.py` serves it over HTTP with
OpenAI's API (`odlora serve`), `chat.py` in a terminal (`odlora chat`).

    from ondevice_lora.runtime import Runtime
    rt = Runtime.open("exports/onnx")
    rt.register_adapter("dates", "dates.onnx_adapter")
    print(rt.generate("Normalise: March 5th, 2021", adapter="dates").text)
"""

from .engine import DEFAULT_CACHE_BYTES, GenerationResult, Runtime

__all__ = ["DEFAULT_CACHE_BYTES", "GenerationResult", "Runtime"]
