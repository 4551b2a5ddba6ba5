"""Model families, chosen by a checkpoint's `model_type`.

Every supported family today is a Llama-style decoder; Qwen2 and Qwen3 differ from Llama only
by flags (q/k/v bias, q/k norm), so one file serves all three instead of three near-copies.
"""

from . import llama

FAMILIES = {"llama": llama, "qwen2": llama, "qwen3": llama}


def family_for(model_type: str):
    """The module (exporting `ModelArgs` and `Model`) that implements `model_type`."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def family_of(model_or_config) -> str:
    """The family name ("llama") of a model built here, or of a Hugging Face config dict: the name of
    the module that implements it, so Qwen2 and Qwen3 are "llama". Exporters declare the families they
    support by these names."""
    if isinstance(model_or_config, dict):
        module = family_for(model_or_config.get("model_type")).__name__
    else:
        module = type(model_or_config).__module__
    return module.rpartition(".")[2]
