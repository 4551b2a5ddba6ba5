"""Kill -9 at chosen instants: every final path holds the old output or the new one, complete;
the next write sweeps what the killed one left; --resume after a kill finishes bit-identically.

Each run is a forked child of this process running `odlora ...` (so it pays for no imports), with
ODLORA_TEST_KILL_AT=POINT:N[:SIGNAL]: the child sends itself SIGKILL (or SIGINT, a Ctrl-C) the Nth
time it reaches `atomic.kill_point(POINT)`. Points: `staged` (the new output complete beside the
final path), `swapped` (right after renameat2's exchange), `set-aside` (between the fallback's two
renames), `pair-pending` / `pair-blob` (between a packed pair's renames), `checkpoint-tensors`
(half-way through writing a checkpoint) and `step` (after each training step).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

from ondevice_lora import atomic
from ondevice_lora.exporters.export import export, pack
from ondevice_lora.formats.manifest import read_manifest
from ondevice_lora.personalization import checkpoint_dir
from ondevice_lora.runtime.adapters import read_sidecar
from ondevice_lora.runtime.bundle import open_bundle, write_bundle
from ondevice_lora.samples import load_examples
from test_runtime import make_adapter

pytest.importorskip("onnxruntime")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHILD_TIMEOUT = 300  # seconds; a child that hangs fails the test instead of the suite


def run_child(body, kill_at: str | None = None) -> tuple[int, str]:
    """Run `body()` in a forked child with ODLORA_TEST_KILL_AT=kill_at; returns (exit code, or
    minus the signal that ended it; what it wrote to stderr)."""
    err = tempfile.TemporaryFile()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.dup2(err.fileno(), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr, sys.stdout = open(2, "w", closefd=False), open(1, "w", closefd=False)  # not pytest's capture
            # A Ctrl-C as a terminal's foreground process gets it: pytest started in the background
            # (`cmd &`, nohup) inherits SIGINT ignored, and the child would train straight through it.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if kill_at:
                os.environ[atomic.KILL_ENV] = kill_at
            code = body() or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {kill_at} hung")
        time.sleep(0.02)
    status = done[1]
    err.seek(0)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), err.read().decode()


def odlora(*args, kill_at: str | None = None) -> tuple[int, str]:
    """`odlora ARGS` in a forked child (see run_child)."""
    from ondevice_lora import cli

    def body():
        sys.argv = ["odlora", *map(str, args)]
        cli.main()

    return run_child(body, kill_at)


def tree(path: Path) -> dict:
    """Relative path -> bytes of every file under `path` (or of `path` itself, a file)."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def side_files(out: Path) -> list[str]:
    """What lies beside `out` that a write to it made: staging, set-aside and pending copies."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.odlora-"))


@pytest.fixture(scope="session")
def made(tiny_model_factory, tmp_path_factory):
    """A tiny fp32 ONNX export (r<=4), two adapters packed for it, a bundle, and training data:
    one of every output the writers replace (tests/test_outputs.py imports it too)."""
    return build_outputs(tmp_path_factory.getbasetemp() / "made", tiny_model_factory("llama"))


@functools.cache  # once per session, for both modules that use `made`
def build_outputs(root: Path, base_dir: Path) -> dict:
    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    root.mkdir()
    export(str(base_dir), "onnx", root / "export", max_rank=4, max_seq_len=64, say=lambda *_: None)
    dirs = {name: make_adapter(base_dir, root / f"adapter-{name}", seed, 4, ALL_LINEAR)
            for name, seed in (("a", 1), ("b", 2))}
    blobs = {name: root / f"{name}.onnx_adapter" for name in dirs}
    for name in dirs:
        pack(dirs[name], root / "export", blobs[name])
    write_bundle(root / "export", [("a", blobs["a"])], root / "bundle")
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in load_examples("dates", "train")[:40]))
    return {"root": root, "base": base_dir, "export": root / "export", "dirs": dirs, "blobs": blobs,
            "bundle": root / "bundle", "data": data}


# -- the swap itself ----------------------------------------------------------------------------------

def write_dir(out: Path, text: str, fallback: bool = False):
    """A child body: write a two-file directory at `out` through atomic.staged_dir."""
    def body():
        if fallback:  # as on a system without renameat2
            atomic._renameat2 = lambda *args: False
        with atomic.staged_dir(out) as tmp:
            for name in ("a", "b"):
                (tmp / name).write_text(f"{text} {name}")
    return body


@pytest.mark.parametrize("point, fallback, expect", [
    ("staged", False, "old"), ("swapped", False, "new"),
    ("staged", True, "old"), ("set-aside", True, None),  # None: nothing at `out` until the next write
])
def test_a_killed_swap_leaves_old_or_new_and_the_next_write_recovers(tmp_path, point, fallback, expect):
    out = tmp_path / "out"
    write_dir(out, "old")()
    old = tree(out)
    code, err = run_child(write_dir(out, "new", fallback), kill_at=f"{point}:1")
    assert code == -signal.SIGKILL, err
    assert side_files(out)  # the killed child's staging or set-aside copy is still there
    states = {"old": old, "new": {"a": b"new a", "b": b"new b"}}
    if expect is None:
        assert not out.exists()
        atomic.prepare(out)  # what the next write does first: the old copy returns
        expect = "old"
    assert tree(out) == states[expect]
    write_dir(out, "newer")()
    assert tree(out) == {"a": b"newer a", "b": b"newer b"} and side_files(out) == []


def test_a_live_writers_staging_is_never_swept(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.{atomic.STAGING}.{os.getppid()}.x"  # our parent is alive
    live.mkdir()
    write_dir(out, "new")()
    assert live.is_dir()


# -- personalize: kills at steps, inside checkpoint writes and at the adapter's swap; Ctrl-C -----------

def test_kills_and_ctrl_c_during_personalize_keep_the_old_adapter_and_resume_bit_identically(made, tmp_path):
    flags = ["--base", made["base"], "--data", made["data"], "--steps", 8, "--save-every", 2, "--eval-every", 0,
             "--batch-size", 4, "--rank", 4, "--alpha", 8, "--lr", 2e-2, "--dtype", "fp32", "--base-quant", "none"]
    straight, out = tmp_path / "straight", tmp_path / "ad"
    assert odlora("personalize", *flags, "--out", straight)[0] == 0
    shutil.copytree(made["dirs"]["a"], out)  # a good adapter the runs below must not lose
    old, ckpt = tree(out), checkpoint_dir(out)

    def checkpoint_step():
        state = json.loads((ckpt / "state.json").read_text())
        assert state["sha256"] == atomic.sha256_file(ckpt / "state.safetensors")  # a complete unit
        return state["step"]

    code, err = odlora("personalize", *flags, "--out", out, "--force", kill_at="step:3:INT")  # Ctrl-C after step 3
    assert code == 130 and f"{out} is unchanged" in err and "--resume" in err, err
    assert tree(out) == old and checkpoint_step() == 3

    resumed = [*flags, "--out", out, "--resume"]
    runs = [("step:2", 4),  # killed after step 5: the checkpoint of step 4 survives (one interval lost at most)
            ("checkpoint-tensors:1", 4),  # killed half-way through writing step 6's: step 4's is intact
            ("swapped:1", 6),  # killed right after step 6's was exchanged in: it is complete
            ("staged:1", 6)]  # steps 7-8 done, the new adapter staged, killed before its swap
    for kill_at, step in runs:
        code, err = odlora("personalize", *resumed, kill_at=kill_at)
        assert code == -signal.SIGKILL, (kill_at, err)
        assert tree(out) == old and checkpoint_step() == step, kill_at
    assert side_files(out) and side_files(ckpt)  # left by the killed runs

    assert odlora("personalize", *resumed)[0] == 0
    assert tree(out)["adapter_model.safetensors"] == tree(straight)["adapter_model.safetensors"]  # bit-identical
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[0] == 7  # the last run redid nothing before its checkpoint
    assert not ckpt.exists() and side_files(out) == [] and side_files(ckpt) == []


# -- export --force, pack over an existing blob, bundle --force --------------------------------------

def test_a_killed_export_force_leaves_a_complete_export(made, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(made["export"], out)
    code, err = odlora("export", "--base", made["base"], "--target", "onnx", "--out", out, "--max-rank", 8,
                       "--max-seq-len", 64, "--force", kill_at="swapped:1")
    assert code == -signal.SIGKILL, err
    assert read_manifest(out, verify=True)["slots"]["max_rank"] == 8  # the new export, every file checked
    (staging,) = side_files(out)  # the old export, complete, swept by the next write to `out`
    assert tree(out.parent / staging) == tree(made["export"])


@pytest.mark.parametrize("point, expect", [("staged", "a"), ("pair-pending", "a"), ("pair-blob", "b")])
def test_a_killed_pack_leaves_a_consistent_pair(made, tmp_path, point, expect):
    blob = tmp_path / "x.onnx_adapter"
    for f in (made["blobs"]["a"], atomic.sidecar_of(made["blobs"]["a"])):
        shutil.copyfile(f, tmp_path / f.name.replace("a.onnx_adapter", blob.name))
    code, err = odlora("adapter", "pack", made["dirs"]["b"], "--export", made["export"], "--out", blob, "--force",
                       kill_at=f"{point}:1")
    assert code == -signal.SIGKILL, err
    manifest = read_manifest(made["export"], verify=False)
    info = read_sidecar(blob, manifest)  # what Runtime.register_adapter checks: target, base, sha256
    assert blob.read_bytes() == made["blobs"][expect].read_bytes() and info["adapter"] == str(made["dirs"][expect])
    pack(made["dirs"]["a"], made["export"], blob, force=True)  # the next pack settles and sweeps
    assert read_sidecar(blob, manifest)["adapter"] == str(made["dirs"]["a"]) and side_files(blob) == []


@pytest.mark.parametrize("point, expect", [("staged", "old"), ("swapped", "new")])
def test_a_killed_bundle_force_leaves_old_or_new(made, tmp_path, point, expect):
    out = tmp_path / "bundle"
    shutil.copytree(made["bundle"], out)
    old = tree(out)
    code, err = odlora("bundle", "--export", made["export"], "--adapter", f"b={made['blobs']['b']}", "--out", out,
                       "--force", kill_at=f"{point}:1")
    assert code == -signal.SIGKILL, err
    ids = [a["id"] for a in open_bundle(out).manifest["adapters"]]  # every file's sha256 checked
    assert (tree(out) == old) if expect == "old" else ids == ["b"]
    write_bundle(made["export"], [("a", made["blobs"]["a"])], out, force=True)
    assert side_files(out) == []
