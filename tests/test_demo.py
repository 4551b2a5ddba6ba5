"""`odlora demo` on a tiny random model: every stage runs, the summary has every field, a rerun
reuses what is still valid and redoes only what changed.

    python -m pytest -q tests/test_demo.py        # tiny model, 2 training steps; ExecuTorch lowers once

The tiny model learns nothing in two steps: these tests check the pipeline, not the scores
(the real default base is `odlora demo` itself; its figures are in the README).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora import demo  # noqa: E402
from ondevice_lora.demo import STATE, DemoConfig, format_summary, quick, run_demo  # noqa: E402
from ondevice_lora.errors import OdloraError  # noqa: E402
from ondevice_lora.samples import SAMPLE_TASKS  # noqa: E402
from conftest import run_cli  # noqa: E402

TARGETS = ("onnx", "executorch") if importlib.util.find_spec("executorch") else ("onnx",)
REUSABLE = [f"personalize {t}" for t in SAMPLE_TASKS] + [s for target in TARGETS for s in (f"export {target}",
                                                                                              f"pack {target}")]


def tiny_config(base_dir: Path, out: Path, **changes) -> DemoConfig:
    cfg = DemoConfig(base=str(base_dir), out=out, targets=TARGETS, steps=2, rank=4, max_rank=8, max_seq_len=128,
                     eval_examples=3, requests=1, swaps=5, threads=1)
    return replace(cfg, **changes)


def run(cfg: DemoConfig):
    lines: list[str] = []
    threads = torch.get_num_threads()
    try:
        summary = run_demo(replace(cfg), say=lines.append)
    finally:
        torch.set_num_threads(threads)  # personalize sets the process's threads
    return summary, lines


@pytest.fixture(scope="module")
def first(tiny_model_factory, tmp_path_factory):
    cfg = tiny_config(tiny_model_factory("llama"), tmp_path_factory.mktemp("demo") / "out")
    summary, lines = run(cfg)
    return cfg, summary, lines


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != STATE}


def test_every_stage_runs_with_a_progress_line(first):
    cfg, summary, lines = first
    names = ["base", *REUSABLE[:len(SAMPLE_TASKS)]]
    for target in TARGETS:
        names += [f"export {target}", f"pack {target}"]
        names += ["held-out exact match (onnx)"] if target == "onnx" else []
        names += [f"requests {target}"]
    assert list(summary["stages"]) == names
    assert not any(t["reused"] for t in summary["stages"].values())
    total = len(names)
    for i, name in enumerate(names, 1):
        assert f"[{i}/{total}] {name} ..." in lines  # a line as it starts
        assert any(line.startswith(f"[{i}/{total}] {name}: ") and line.endswith(")") for line in lines)  # and ends
    assert (cfg.out / STATE).is_file()


def test_summary_has_every_field(first):
    cfg, s, lines = first
    assert set(s["adapters"]) == set(SAMPLE_TASKS)
    for a in s["adapters"].values():
        assert a["steps"] == 2 and a["val_loss"] > 0 and Path(a["dir"], "adapter_model.safetensors").is_file()
    assert set(s["held_out"]) == set(SAMPLE_TASKS)
    for h in s["held_out"].values():
        assert h["examples"] == 3 and 0 <= h["base"] <= 1 and 0 <= h["adapter"] <= 1 and h["samples"]
    assert list(s["runtimes"]) == list(TARGETS)
    for target, r in s["runtimes"].items():
        assert r["quant"] == cfg.quant[target]
        assert r["export_bytes"] == sum(r["export_files"].values()) > 0
        assert all(r["packed"][t]["bytes"] == Path(r["packed"][t]["file"]).stat().st_size > 0 for t in SAMPLE_TASKS)
        assert set(r["cold_load_ms"]) == set(SAMPLE_TASKS)
        assert r["adapter_loads"] == len(SAMPLE_TASKS)  # each adapter read from disk once: swaps never reload
        swap = r["swap"]
        assert swap["swaps"] == 5 and 0 <= swap["swap_ms_p50"] <= swap["swap_ms_p99"]
        assert swap["same_adapter_ms_p50"] >= 0 and swap["step_ms_after_swap_p50"] > 0 and swap["step_ms_same_adapter_p50"] > 0
        # requests alternate the adapters, then ask the base
        assert [q["adapter"] for q in r["requests"]] == [*SAMPLE_TASKS, "base", "base"]
        assert all({"prompt", "answer", "expected", "match"} <= set(q) for q in r["requests"])
    json.dumps(s)  # --json prints it as is
    table = format_summary(s)
    for text in ("held-out exact match", *SAMPLE_TASKS, *(f"{t} {cfg.quant[t]}" for t in TARGETS), "swap p50 / p99",
                 "cold load", "stages (m:ss):"):
        assert text in table
    if len(TARGETS) > 1:  # the first runtime's results are shown before the next export starts
        first_table = next(i for i, line in enumerate(lines) if "== odlora demo" in line)
        assert first_table < next(i for i, line in enumerate(lines) if line.endswith("] export executorch ..."))


def test_rerun_reuses_every_valid_output(first):
    cfg, summary, _ = first
    before = mtimes(cfg.out)
    again, lines = run(cfg)
    assert mtimes(cfg.out) == before  # nothing rewritten
    stages = again["stages"]
    assert all(stages[name]["reused"] for name in [*REUSABLE, "held-out exact match (onnx)"])
    assert not stages["base"]["reused"] and not stages[f"requests {TARGETS[0]}"]["reused"]  # live: checked each run
    assert again["held_out"] == summary["held_out"] and again["adapters"] == summary["adapters"]
    assert any(line.startswith("[2/") and ": reused, val loss" in line for line in lines)


def test_rerun_redoes_what_changed(first, tmp_path):
    cfg, summary, _ = first
    # A damaged blob is packed again (and the held-out score, which read it, recomputed);
    # the adapters and exports stay.
    blob = Path(summary["runtimes"]["onnx"]["packed"]["dates"]["file"])
    blob.write_bytes(b"not an adapter")
    again, _ = run(replace(cfg, targets=("onnx",)))
    stages = again["stages"]
    assert stages["pack onnx"]["reused"] is False
    assert all(stages[n]["reused"] for n in ("personalize dates", "personalize contacts", "export onnx"))
    assert stages["held-out exact match (onnx)"]["reused"]  # the same blob bytes again: the same score
    assert blob.stat().st_size == summary["runtimes"]["onnx"]["packed"]["dates"]["bytes"]
    # Other training settings retrain the adapters, then repack; the export stays.
    again, _ = run(replace(cfg, targets=("onnx",), steps=3))
    stages = again["stages"]
    assert not stages["personalize dates"]["reused"] and not stages["pack onnx"]["reused"]
    assert stages["export onnx"]["reused"] and again["adapters"]["dates"]["steps"] == 3
    # --fresh redoes even what is valid.
    again, _ = run(replace(cfg, targets=("onnx",), steps=3, fresh=True))
    assert not any(t["reused"] for t in again["stages"].values())


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(OdloraError, match="^targets: "):  # the setting (the CLI prints --targets)
        run_demo(DemoConfig(out=tmp_path / "x", targets=("tflite",)), say=lambda m: None)
    assert not (tmp_path / "x").exists()
    cfg = quick(DemoConfig())
    assert cfg.targets == ("onnx",) and cfg.steps == 20 and cfg.eval_examples == 20


def test_cli_help_and_json(monkeypatch, capsys, first, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "demo", "--help")
    assert code == 0
    for flag in ("--out", "--targets", "--steps", "--json", "--quick", "--fresh"):
        assert flag in out
    for flags, problem in ((["--targets", "onnx,tflite"], "--targets"), (["--quant", "onnx=int3"], "--quant onnx=int3"),
                           (["--quant", "int4"], "TARGET=QUANT")):
        code, _, err = run_cli(monkeypatch, capsys, "demo", *flags, "--out", tmp_path / "unused")
        assert code == 2 and problem in err and not (tmp_path / "unused").exists()
    cfg, summary, _ = first  # the same settings as flags: every stage reused, the summary as JSON
    # The tiny model's rank, slots and KV cache are no CLI flags: the CLI's config gets them here.
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(DemoConfig, rank=cfg.rank, max_rank=cfg.max_rank,
                                                              max_seq_len=cfg.max_seq_len, requests=cfg.requests,
                                                              swaps=cfg.swaps))
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(monkeypatch, capsys, "demo", "--base", cfg.base, "--out", cfg.out,
                                 "--targets", ",".join(TARGETS), "--steps", "2", "--examples", "3", "--threads", "1",
                                 "--json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["held_out"] == summary["held_out"]
    assert "== odlora demo" in out and "[1/" in err

