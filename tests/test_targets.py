"""Exporters know the model families they export, and refuse any other before writing anything."""

import importlib

import pytest

from ondevice_lora.base import load_base
from ondevice_lora.config import LoraConfig
from ondevice_lora.errors import OdloraError
from ondevice_lora.exporters import executorch_train
from ondevice_lora.exporters.export import check_family, export, export_trainable
from ondevice_lora.formats.targets import TARGETS, TRAINING_TARGET
from ondevice_lora.models import family_of
from conftest import TINY_VARIANTS

EXPORTERS = {**{name: t.exporter for name, t in TARGETS.items()}, TRAINING_TARGET: executorch_train.__name__}


@pytest.mark.parametrize("model_type", sorted({model_type for model_type, _ in TINY_VARIANTS.values()}))
def test_every_supported_architecture_is_the_llama_family(model_type):
    assert family_of({"model_type": model_type}) == "llama"


@pytest.mark.parametrize("target", EXPORTERS)
def test_a_llama_model_passes_every_exporters_check(tiny_llama_dir, target):
    model = load_base(str(tiny_llama_dir)).model
    assert family_of(model) == "llama"
    check_family(model, importlib.import_module(EXPORTERS[target]), target)


@pytest.mark.parametrize("target", TARGETS)
def test_export_refuses_a_family_its_exporter_does_not_know(tiny_llama_dir, tmp_path, monkeypatch, target):
    monkeypatch.setattr("ondevice_lora.exporters.export.family_of", lambda model: "mamba")
    with pytest.raises(OdloraError, match=rf"the {target} exporter cannot export model family 'mamba' \(supports: llama\)"):
        export(str(tiny_llama_dir), target, tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_the_trainable_export_refuses_it_too(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(executorch_train, "FAMILIES", ("mamba",))
    with pytest.raises(OdloraError, match=r"cannot export model family 'llama' \(supports: mamba\)"):
        export_trainable(load_base(str(tiny_llama_dir)), tmp_path / "out", LoraConfig(), 1, 16, say=lambda _: None)
    assert not (tmp_path / "out").exists()
