"""Every bad flag and data path of every command: one clean line, exit 2, nothing touched.

Each row of BAD runs `odlora PREFIX[command] EXTRA` and asserts: exit code 2, exactly one line on
stderr, starting `odlora: error:` and holding the row's words (the flag or file, and what is
wrong), no traceback, nothing on stdout, done within LIMIT_S, the --out path not created and the
training data unchanged. Rows run in-process (fast) unless marked PROC: those need a real process
(a FIFO that must not hang the reader; the subprocess's timeout catches a hang). Click's own
errors (unknown option, missing option, a value that is not a number) take the same one-line
form. Everything is a tiny model from conftest.py, so nothing loads the real base.

    python -m pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from conftest import run_cli
from ondevice_lora import cli
from ondevice_lora.bounds import RANK, SEED, TEMPERATURE, Bound
from ondevice_lora.capacity import activation_bytes_per_token, check_training_memory
from ondevice_lora.errors import OdloraError

LIMIT_S = 30  # per in-process row: seconds with the tiny model, generous for a shared 2-core machine
PROC_TIMEOUT_S = 120  # a subprocess imports torch first; a FIFO that hung would never finish
CONTEXT = TINY_CONFIG["max_position_embeddings"]
KV_DIM = TINY_CONFIG["num_key_value_heads"] * TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
PROC = "proc"

PREFIX = {
    "generate": "generate --base {base} --prompt hi --max-new-tokens 2",
    "personalize": "personalize --base {base} --data {data} --out {out} --steps 1",
    "export": "export --base {base} --target onnx --out {out} --max-seq-len 64",
    "trainable": "export --base {base} --target executorch --trainable --out {out} --seq-len 64",
    "run": "run --export {dir} --prompt hi",
    "run-real": "run --export {export} --prompt hi --max-new-tokens 2",
    "chat": "chat --export {dir}",
    "merge": "merge --base {base} --out {out}",
    "inspect": "adapter inspect",
    "pack": "adapter pack {junk} --out {out}",
    "bundle": "bundle --out {out}",
    "verify": "verify",
    "serve": "serve --export {dir}",
    "demo": "demo --out {out}",
    "base": "base",
}

# (command, extra arguments, words the error line must hold[, PROC])
BAD = [
    # -- generate: sampling flags, adapters, prompt, base
    ("generate", "--temperature nan", ["--temperature", "from 0 to 2", "nan"]),
    ("generate", "--temperature inf", ["--temperature", "inf"]),
    ("generate", "--temperature 5", ["--temperature", "from 0 to 2"]),
    ("generate", "--temperature -1", ["--temperature"]),
    ("generate", "--top-p 0", ["--top-p", "> 0 and <= 1"]),
    ("generate", "--top-p nan", ["--top-p", "nan"]),
    ("generate", "--top-p 1.5", ["--top-p"]),
    ("generate", "--top-k -2", ["--top-k", ">= 0"]),
    ("generate", "--top-k 1.5", ["--top-k", "not an integer"]),
    ("generate", "--max-new-tokens 0", ["--max-new-tokens", ">= 1"]),
    ("generate", "--max-new-tokens abc", ["--max-new-tokens", "not an integer"]),
    ("generate", "--seed 1e23", ["--seed", "'1e23' is not an integer"]),
    ("generate", "--seed -1", ["--seed", "from 0 to"]),
    ("generate", f"--seed {2**63}", ["--seed", str(2**63)]),
    ("generate", "--stop ''", ["--stop", "non-empty"]),
    ("generate", "--adapter {junk}:nan", ["--adapter", "finite", "nan"]),
    ("generate", "--adapter {junk}:-inf", ["--adapter", "finite"]),
    ("generate", "--adapter {junk}", ["junk", "not an adapter directory"]),
    ("generate", "--adapter {missing}", ["missing", "no such adapter directory"]),
    ("generate", "--prompt caf\udce9", ["--prompt", "not valid UTF-8", "0xe9"]),
    ("generate", "--base {junk}", ["junk", "no config.json"]),
    ("generate", "--base {data}", ["data.jsonl"]),
    ("generate", "--frobnicate", ["--frobnicate"]),
    # -- personalize: every numeric flag, the specs, the data paths
    ("personalize", "--rank 0", ["--rank", "from 1 to 256"]),
    ("personalize", "--rank 100000", ["--rank", "100000"]),
    ("personalize", "--rank 2.5", ["--rank", "not an integer"]),
    ("personalize", f"--rank {KV_DIM + 1}", ["--rank", f"exceeds {KV_DIM}", "k_proj"]),
    ("personalize", f"--rank {KV_DIM + 1} --dry-run", ["--rank", f"exceeds {KV_DIM}"]),
    ("personalize", "--alpha nan", ["--alpha", "> 0", "nan"]),
    ("personalize", "--alpha 0", ["--alpha"]),
    ("personalize", "--alpha -inf", ["--alpha"]),
    ("personalize", "--dropout 1", ["--dropout", "< 1"]),
    ("personalize", "--dropout nan", ["--dropout"]),
    ("personalize", "--lr nan", ["--lr", "nan"]),
    ("personalize", "--lr inf", ["--lr", "inf"]),
    ("personalize", "--lr 0", ["--lr", "> 0 and <= 10"]),
    ("personalize", "--lr 1e3", ["--lr", "1000"]),
    ("personalize", "--epochs nan", ["--epochs", "nan"]),
    ("personalize", "--epochs 0", ["--epochs"]),
    ("personalize", "--epochs inf", ["--epochs"]),
    ("personalize", "--steps 0", ["--steps", ">= 1"]),
    ("personalize", "--steps -3", ["--steps"]),
    ("personalize", "--batch-size 0", ["--batch-size"]),
    ("personalize", "--grad-accum 0", ["--grad-accum"]),
    ("personalize", "--seq-len 4", ["--seq-len", ">= 8"]),
    ("personalize", "--seq-len 100000", ["--seq-len", f"context of {CONTEXT}"]),
    ("personalize", f"--seq-len {CONTEXT + 1} --dry-run", ["--seq-len", f"context of {CONTEXT}"]),
    ("personalize", "--batch-size 100000000 --seq-len 64", ["--batch-size", "--seq-len", "available", "fit"]),
    ("personalize", "--val-split nan", ["--val-split"]),
    ("personalize", "--val-split 0.7", ["--val-split", "from 0 to 0.5"]),
    ("personalize", "--val-split -0.1", ["--val-split"]),
    ("personalize", "--seed 1e23", ["--seed", "not an integer"]),
    ("personalize", "--seed -5", ["--seed"]),
    ("personalize", "--threads -1", ["--threads", "from 1 to"]),
    ("personalize", "--threads 0", ["--threads"]),
    ("personalize", "--threads 100000", ["--threads"]),
    ("personalize", "--eval-every -1", ["--eval-every", ">= 0"]),
    ("personalize", "--save-every -1", ["--save-every"]),
    ("personalize", "--early-stopping -1", ["--early-stopping"]),
    ("personalize", "--targets foo", ["--targets", "foo", "match no linear"]),
    ("personalize", "--targets ,", ["--targets", "names no module"]),
    ("personalize", "--targets 'q_proj;v'", ["--targets", "not a module name"]),
    ("personalize", "--layers 1-0", ["--layers", "A <= B"]),
    ("personalize", "--layers x", ["--layers", "expected"]),
    ("personalize", "--layers 1,,2", ["--layers", "expected"]),
    ("personalize", "--layers 5", ["--layers", "outside 0-1"]),
    ("personalize", "--layers -1", ["--layers"]),
    ("personalize", "--base-quant int3", ["--base-quant", "int3"]),
    ("personalize", "--engine tflite", ["--engine", "tflite"]),
    ("personalize", "--engine executorch --program {missing}", ["--program", "does not exist"]),
    ("personalize", "--data {missing}", ["missing", "no such file or directory"]),
    ("personalize", "--data /dev/null", ["/dev/null", "character device", "not a regular file"]),
    ("personalize", "--data {tsv}", ["x.tsv", "unsupported file type"]),
    ("personalize", "--data {linkdir}", ["pw.txt", "symlink inside a data directory"]),
    ("personalize", "--data {big}", ["big.txt", "over the limit"]),
    ("personalize", "--data {emptydir}", ["emptydir", "no data files"]),
    ("personalize", "--data {data}/x", ["data.jsonl/x", "Not a directory"]),
    ("personalize", "--val-data /dev/zero", ["/dev/zero", "character device"]),
    ("personalize", "--data {fifo}", ["pipe.jsonl", "FIFO"], PROC),
    ("personalize", "--val-data {fifo}", ["pipe.jsonl", "FIFO"], PROC),
    ("personalize", "--data {fifodir}", ["pipe.jsonl", "FIFO"], PROC),
    ("personalize", "--data {data} --rank nan", ["--rank", "not an integer"], PROC),
    # -- export, and export --trainable
    ("export", "--max-seq-len 0", ["--max-seq-len", ">= 16"]),
    ("export", "--max-seq-len 8", ["--max-seq-len"]),
    ("export", "--max-seq-len 100000", ["--max-seq-len", f"{CONTEXT} positions"]),
    ("export", "--max-rank 0", ["--max-rank", "from 1 to 256"]),
    ("export", "--max-rank 1000", ["--max-rank"]),
    ("export", "--targets foo", ["--targets", "foo"]),
    ("export", "--quant zz", ["--quant", "zz"]),
    ("export", "--target tflite", ["--target", "tflite"]),
    ("trainable", "--rank 0", ["--rank"]),
    ("trainable", "--alpha nan", ["--alpha", "nan"]),
    ("trainable", "--seq-len 1000", ["--seq-len", f"context of {CONTEXT}"]),
    ("trainable", "--batch-size 0", ["--batch-size"]),
    ("trainable", "--target onnx", ["--trainable", "--target executorch"]),
    # -- run and chat: flags before the export loads, then a real export's adapters
    ("run", "--temperature nan", ["--temperature", "nan"]),
    ("run", "--adapter {junk}/x:nan", ["--adapter", "finite"]),
    ("run", "--export {data}", ["--export", "is a file"]),
    ("run", "--export {missing}", ["--export", "does not exist"]),
    ("run", "--export {junk}", ["junk", "not an odlora export"]),
    ("run", "--backend tflite", ["--backend", "tflite"]),
    ("run", "--prompt", ["--prompt", "requires an argument"]),
    ("run-real", "--adapter {missing}.onnx_adapter", ["missing.onnx_adapter", "no such packed adapter"]),
    ("run-real", "--adapter {junk}/x", ["junk/x", "no sidecar"]),
    ("run-real", "--adapter base={junk}/x", ["`base`"]),
    ("chat", "--temperature nan", ["--temperature"]),
    ("chat", "--top-p 2", ["--top-p"]),
    ("chat", "--export {missing}", ["--export", "does not exist"]),
    # -- merge, adapter inspect / pack, bundle, verify
    ("merge", "--adapter {junk}:nan", ["--adapter", "finite"]),
    ("merge", "--adapter {junk}:1e400", ["--adapter", "inf"]),
    ("merge", "--adapter {junk}", ["junk", "not an adapter directory"]),
    ("merge", "", ["--adapter", "Missing option"]),
    ("inspect", "{junk}", ["junk", "not an adapter directory"]),
    ("inspect", "{missing}", ["missing", "no such adapter directory"]),
    ("pack", "--export {dir}", ["not an odlora export"]),
    ("pack", "--export {missing}", ["--export", "does not exist"]),
    ("bundle", "--export {junk}", ["junk", "not an odlora export"]),
    ("bundle", "--export {missing}", ["--export", "does not exist"]),
    ("bundle", "--export {dir} --adapter base={junk}/x", ["adapter id 'base'", "`base`"]),
    ("bundle", "--export {dir} --adapter a:b={junk}/x", ["adapter id 'a:b'"]),
    ("verify", "{data}", ["BUNDLE", "is a file"]),
    ("verify", "{missing}", ["BUNDLE", "does not exist"]),
    ("verify", "{junk}", ["junk", "not an odlora bundle"]),
    ("verify", "{junk} --base {data}", ["--base", "is a file"]),
    # -- serve (the flags only: nothing starts), demo, base
    ("serve", "--port 99999", ["--port", "from 0 to 65535"]),
    ("serve", "--port -1", ["--port"]),
    ("serve", "--port http", ["--port", "not an integer"]),
    ("demo", "--steps 0", ["--steps", ">= 1"]),
    ("demo", "--steps 1.5", ["--steps", "not an integer"]),
    ("demo", "--examples 0", ["--examples"]),
    ("demo", "--threads -1", ["--threads"]),
    ("demo", "--targets foo", ["--targets", "foo"]),
    ("demo", "--targets ,", ["--targets", "none"]),
    ("demo", "--quant foo", ["--quant", "TARGET=QUANT"]),
    ("demo", "--quant onnx=zz", ["--quant onnx=zz"]),
    ("demo", "--quant foo=int4", ["--quant foo=int4", "not a runtime"]),
    ("base", "info {junk}", ["junk", "no config.json"]),
    ("base", "info {missing}", ["missing", "no such directory"]),
    ("base", "info {data}", ["data.jsonl"]),
    ("base", "pull no-such-base", ["no-such-base", "unknown base"]),
]


def row_id(row) -> str:
    return f"{row[0]} {row[1]}".replace("{", "").replace("}", "")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """The paths the rows name: a tiny base, good data, and every kind of bad path."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "say {i}", "completion": " ok {i}"}}\n' for i in range(20)))
    (root / "dir").mkdir()
    (root / "emptydir").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "x").write_text("not an adapter, export, bundle or blob")
    (root / "x.tsv").write_text("a\tb\n")
    (root / "secret.txt").write_text("a file outside the data directory\n")
    (root / "linkdir").mkdir()
    (root / "linkdir" / "data.jsonl").write_bytes(data.read_bytes())
    (root / "linkdir" / "pw.txt").symlink_to(root / "secret.txt")
    with open(root / "big.txt", "wb") as f:  # sparse: 65 MiB that take no disk
        f.truncate(65 * 2**20)
    os.mkfifo(root / "pipe.jsonl")
    (root / "fifodir").mkdir()
    (root / "fifodir" / "data.jsonl").write_bytes(data.read_bytes())
    os.mkfifo(root / "fifodir" / "pipe.jsonl")
    # Imported once here: their first import prints third-party noise that would count as lines.
    import ondevice_lora.exporters.export  # noqa: F401
    import ondevice_lora.runtime  # noqa: F401

    return {"base": tiny_model_factory("llama"), "data": data, "dir": root / "dir", "emptydir": root / "emptydir",
            "junk": root / "junk", "tsv": root / "x.tsv", "linkdir": root / "linkdir", "big": root / "big.txt",
            "fifo": root / "pipe.jsonl", "fifodir": root / "fifodir", "missing": root / "missing", "root": root}


@pytest.fixture(scope="module")
def onnx_export(world):
    """A tiny ONNX export, for the rows whose error comes from a real export's adapters."""
    from ondevice_lora.exporters.export import export

    out = world["root"] / "export"
    export(str(world["base"]), "onnx", out, max_rank=8, max_seq_len=64, say=lambda *_: None)
    return out


def run_process(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "ondevice_lora", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=PROC_TIMEOUT_S)
    return done.returncode, done.stdout, done.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("row", BAD, ids=[row_id(r) for r in BAD])
def test_bad_input_is_one_clean_line(row, world, request, tmp_path, monkeypatch, capsys):
    command, extra, words, *mode = row
    paths = {**world, "out": tmp_path / "out"}
    if "{export}" in PREFIX[command]:
        paths["export"] = request.getfixturevalue("onnx_export")
    argv = [a.format(**paths) for a in shlex.split(PREFIX[command]) + shlex.split(extra)]
    data_before = digest(world["data"])
    started = time.perf_counter()
    if mode == [PROC]:
        code, out, err = run_process(argv, tmp_path)
    else:
        code, out, err = run_cli(monkeypatch, capsys, *argv)
        assert time.perf_counter() - started < LIMIT_S
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("odlora: error: "), err
    for word in words:
        assert word.format(**paths) in lines[0], (word, lines[0])
    assert out == ""
    assert not paths["out"].exists()
    assert digest(world["data"]) == data_before


def test_the_table_covers_every_command():
    covered = {PREFIX[row[0]].split()[0] for row in BAD}
    assert set(cli.cli.commands) <= covered
    assert len(BAD) >= 80


# -- what is allowed --------------------------------------------------------------------------

def test_a_symlink_the_user_names_is_read(world, tmp_path, monkeypatch, capsys):
    link = tmp_path / "mine.jsonl"
    link.symlink_to(world["data"])
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", world["base"], "--data", link,
                               "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj" in out


def test_an_unreadable_file_is_one_line(world, tmp_path, monkeypatch, capsys):
    """Permissions: simulated, since these tests may run as root (who reads every file)."""
    class Unreadable:  # the os module as user_files sees it, but open() of the data file is refused
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, *args, **kwargs):
            if Path(path) == Path(world["data"]):
                raise PermissionError(13, "Permission denied", str(path))
            return os.open(path, *args, **kwargs)  # the base's JSON files are read through user_files too

    monkeypatch.setattr("ondevice_lora.user_files.os", Unreadable())
    code, out, err = run_cli(monkeypatch, capsys, "personalize", "--base", world["base"], "--data", world["data"],
                             "--out", tmp_path / "out")
    assert code == 2 and err.strip().splitlines() == [f"odlora: error: {world['data']}: cannot open (Permission denied)"]
    assert not (tmp_path / "out").exists()


def test_chat_warns_on_stdin_that_is_not_utf8(onnx_export, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ondevice_lora", "chat", "--export", str(onnx_export),
                           "--max-new-tokens", "2"], input=b"caf\xe9 au lait\n/quit\n", cwd=tmp_path,
                          capture_output=True, timeout=PROC_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"not valid UTF-8 at byte 3" in done.stdout
    assert done.stdout.count(b"> ") >= 2  # it answered the line, then read /quit


def test_an_unexpected_exception_still_shows(monkeypatch):
    """main() turns our errors and click's into one line, but a bug keeps its traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sys, "argv", ["odlora", "base", "info", "x"])
    monkeypatch.setattr("ondevice_lora.base.load_base", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()


# -- the bounds and the capacity checks themselves ------------------------------------------------

@pytest.mark.parametrize("bound, good, bad", [
    (RANK, [1, 256], [0, 257, 8.0, True, "8", float("nan")]),
    (SEED, [0, 2**63 - 1], [-1, 2**63, 1e23]),
    (TEMPERATURE, [0, 0.7, 2], [-0.1, 2.01, float("nan"), float("inf"), None]),
    (Bound(0, 1, low_open=True), [1e-9, 1], [0, -1]),
    (Bound(), [-1e300, 0, 3], [float("inf"), float("-inf"), float("nan")]),
])
def test_bounds_hold_and_refuse(bound, good, bad):
    for value in good:
        assert bound.check(value, "--x") == value
    for value in bad:
        with pytest.raises(OdloraError, match=r"^--x: must be "):
            bound.check(value, "--x")


def test_memory_refusal_suggests_a_batch_that_fits():
    config = {**TINY_CONFIG, "num_hidden_layers": 30, "vocab_size": 50_000}
    per_token = activation_bytes_per_token(config, 2, checkpointing=False)
    available = per_token * 1000  # room for 1000 tokens
    check_training_memory(config, 8, 125, 2, False, available=available)  # exactly 1000 fits
    with pytest.raises(OdloraError, match=r"seq_len (\d+) at batch_size 8") as e:  # the library names settings
        check_training_memory(config, 8, 126, 2, False, available=available)
    suggested = int(e.value.args[0].split("seq_len ")[-1].split()[0])
    check_training_memory(config, 8, suggested, 2, False, available=available)  # the suggestion itself fits
    with pytest.raises(OdloraError, match=r"batch_size (\d+) at seq_len 500"):
        check_training_memory(config, 400, 500, 2, False, available=available)
    # Activation checkpointing keeps less per token, so it may fit where the plain run does not.
    assert activation_bytes_per_token(config, 2, checkpointing=True) < per_token
