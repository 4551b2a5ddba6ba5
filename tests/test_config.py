"""The configs own every default (config.py): the CLI, the demo and the web app read them, and one
adapter-id rule (formats/adapter_ids.py) holds for the runtime, the CLI, bundles and the web app."""

import pytest
from click.testing import CliRunner

from ondevice_lora.cli import cli
from ondevice_lora.config import (DEFAULT_BASE_QUANT, MIN_DEFAULT_STEPS, LoraConfig, PersonalizeConfig, SamplingConfig,
                                  TrainConfig, default_of)
from ondevice_lora.demo import DemoConfig
from ondevice_lora.errors import OdloraError
from ondevice_lora.formats.adapter_ids import adapter_id_from, check_adapter_id, is_adapter_id


def test_default_of_reads_the_dataclass():
    assert default_of(TrainConfig, "lr") == TrainConfig().lr
    assert default_of(LoraConfig, "targets") == LoraConfig().targets
    assert default_of(SamplingConfig, "stop") == [] and default_of(PersonalizeConfig, "base_quant") is None


def test_the_base_is_held_as_the_engine_needs_unless_asked():
    assert PersonalizeConfig().base_quant == DEFAULT_BASE_QUANT["torch"] == "int8"
    assert PersonalizeConfig(engine="executorch").base_quant == DEFAULT_BASE_QUANT["executorch"] == "none"
    assert PersonalizeConfig(engine="executorch", base_quant="int8").base_quant == "int8"


def test_alpha_is_twice_the_rank_unless_given():
    assert LoraConfig(rank=4).alpha == 8 and LoraConfig(rank=4, alpha=3).alpha == 3


@pytest.mark.parametrize("command,flag,config,field", [
    ("personalize", "--lr", TrainConfig, "lr"), ("personalize", "--rank", LoraConfig, "rank"),
    ("personalize", "--seq-len", PersonalizeConfig, "seq_len"), ("personalize", "--eval-every", TrainConfig, "eval_every"),
    ("export", "--batch-size", TrainConfig, "batch_size"), ("run", "--max-new-tokens", SamplingConfig, "max_new_tokens"),
])
def test_help_shows_the_configs_default(command, flag, config, field):
    help_text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
    assert f"{flag} " in help_text and f"[default: {default_of(config, field)}]" in help_text.split(f"{flag} ", 1)[1][:400]


def test_an_unset_flag_leaves_the_configs_default(monkeypatch, tmp_path):
    """`personalize` hands the library only what was said: the config built from no flags is the default one."""
    import ondevice_lora.personalization as personalize_module

    seen = {}
    monkeypatch.setattr(personalize_module, "dry_run", lambda cfg, data: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(personalize_module, "format_dry_run", lambda info: "")
    result = CliRunner().invoke(cli, ["personalize", "--data", "dates", "--out", str(tmp_path / "a"), "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.training == TrainConfig() and cfg.lora == LoraConfig()
    assert (cfg.seq_len, cfg.val_split, cfg.base_quant, cfg.layers) == (128, 0.1, "int8", "all")


def test_the_demo_trains_with_the_personalize_defaults():
    demo = DemoConfig()
    assert (demo.steps, demo.rank, demo.lr, demo.seed) == (MIN_DEFAULT_STEPS, LoraConfig().rank, TrainConfig().lr,
                                                         TrainConfig().seed)
    assert demo.base_quant == PersonalizeConfig().base_quant


@pytest.mark.parametrize("name", ["dates", "a", "v1.2", "my_adapter-2", "x" * 64])
def test_adapter_ids_that_name_a_request_and_a_file(name):
    assert is_adapter_id(name) and check_adapter_id(name) == name


@pytest.mark.parametrize("name", ["base", "", "a:b", "a+b", "../x", ".hidden", "-x", "a b", "a/b", "x" * 65, "é", 5])
def test_adapter_ids_that_are_refused(name):
    assert not is_adapter_id(name)
    with pytest.raises(OdloraError, match="adapter id"):
        check_adapter_id(name)


def test_a_blobs_id_is_its_stem():
    assert adapter_id_from("packed/dates.onnx_adapter") == "dates"
    assert adapter_id_from("v1.2.slots") == "v1.2"


def test_library_errors_name_the_setting_and_the_cli_its_flag(monkeypatch, capsys):
    with pytest.raises(OdloraError, match="^prompt_format: 'jsonl' is not one of chat, raw$") as caught:
        from ondevice_lora.prompts import resolve_prompt_format
        resolve_prompt_format("jsonl", tokenizer=None)
    assert caught.value.for_cli({"prompt_format": "--format"}) == "--format: 'jsonl' is not one of chat, raw"
    with pytest.raises(OdloraError, match="^lr: must be") as caught:
        TrainConfig(lr=float("nan")).validate()
    assert caught.value.for_cli().startswith("--lr: must be")


def test_parameters_inside_a_message_are_spelled_for_the_reader():
    from ondevice_lora.capacity import check_training_memory

    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": 256}
    with pytest.raises(OdloraError) as caught:
        check_training_memory(config, 8, 128, 4, checkpointing=False, available=1000)
    library, cli = str(caught.value), caught.value.for_cli()
    assert library.startswith("batch_size x seq_len: 8 x 128 tokens") and "add activation_checkpointing" in library
    assert cli.startswith("--batch-size x --seq-len: 8 x 128 tokens") and "add --activation-checkpointing" in cli
    assert "\x1f" not in library + cli
