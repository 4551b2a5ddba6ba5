"""`odlora personalize --config FILE`: options from TOML or YAML, the command line overriding them.

    python -m pytest -q tests/test_config_file.py
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def dry_run(monkeypatch, capsys, *args) -> dict:
    result = run_cli(monkeypatch, capsys, "personalize", "--dry-run", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'base = "{base}"\ndata = "dates"\nout = "{out}"\nrank = 4\nbatch-size = 2\ntargets = "qv"\n'),
    (".yaml", "base: {base}\ndata: dates\nout: {out}\nrank: 4\nbatch_size: 2\ntargets: qv\n"),
])
def test_options_come_from_the_file_and_the_command_line_wins(tmp_path, monkeypatch, capsys, tiny_llama_dir,
                                                              suffix, text):
    config = tmp_path / f"run{suffix}"
    config.write_text(text.format(base=tiny_llama_dir, out=tmp_path / "adapter"))
    from_file = dry_run(monkeypatch, capsys, "--config", config)
    flags = dry_run(monkeypatch, capsys, "--base", tiny_llama_dir, "--data", "dates", "--out", tmp_path / "adapter",
                    "--rank", 4, "--batch-size", 2, "--targets", "qv")
    assert from_file == flags and from_file["rows_per_step"] == 2
    overridden = dry_run(monkeypatch, capsys, "--config", config, "--rank", 2)
    assert overridden["trainable_parameters"] * 2 == from_file["trainable_parameters"]


@pytest.mark.parametrize("name,text,message", [
    ("run.toml", "rank = 4\nbogus = 1\n", "'bogus' is not an option of this command"),
    ("run.toml", "rank = \n", "--config: "),
    ("run.yaml", "rank: [\n", "--config: "),
    ("run.yaml", "- rank\n", "expected a table of option = value"),
    ("run.ini", "rank=4\n", "a config file is .toml, .yaml or .yml"),
    ("run.yaml", "rank: 0\ndata: dates\nout: x\n", "--rank"),
])
def test_a_bad_config_file_is_one_line(tmp_path, monkeypatch, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    result = run_cli(monkeypatch, capsys, "personalize", "--config", tmp_path / name)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
