"""The one way a module of a model is swapped for another: LoRA training (`lora.apply_lora`),
attaching a saved adapter (`adapter.attach_adapter`), adapter slots (`models.slots.apply_slots`) and
the quantised frozen base (`quant.quantize_base`) all replace linears through `replace_linears`."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def replace_linears(model: nn.Module, names: Iterable[str], factory: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace each module of `model` named in `names` (full dotted names) by `factory(name, module)`;
    returns the names, in order."""
    replaced = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, factory(name, getattr(parent, child)))
        replaced.append(name)
    return replaced
