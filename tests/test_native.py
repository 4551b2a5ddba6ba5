"""The native runtime (runtime/native, C++ against the executorch wheel) on the same bundles as the
Python runtime: the same greedy tokens, the same refusals; built for this machine and cross-built
for ARM64 (a phone's CPU: XNNPACK's ARM kernels), which runs here under qemu-user.

    python -m pytest -q tests/test_native.py     # builds build/native and build/native-aarch64 once, then seconds

Needs CMake >= 3.28 (the `test` extra) and the system packages in runtime/native_build.py (for
ARM64 its CROSS table's); CI installs them and sets ODLORA_REQUIRE_NATIVE=1 and
ODLORA_REQUIRE_ARM64=1, so that a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ondevice_lora.errors import OdloraError
from ondevice_lora.config import SamplingConfig
from ondevice_lora.runtime import Runtime
from test_bundle import BAD_BUNDLES, edited
from test_runtime import PROMPT

REQUESTS = [  # (adapter, prompt, chat): adapters alternate on one loaded base
    ("a", PROMPT, True), ("b", PROMPT, True), ("base", PROMPT, True), ("a", "My friend writes", False),
    ("b", "She remembers 12 apples!", True), ("a", PROMPT, True),
]


@pytest.fixture(scope="session", params=["host", "aarch64"])
def native(request) -> list[str]:
    """The command that runs odlora-native: built for this machine, or for ARM64 and run under qemu."""
    from ondevice_lora.runtime.native_build import DEFAULT_BUILD_DIR, build, runner

    arch = None if request.param == "host" else request.param
    required = os.environ.get("ODLORA_REQUIRE_NATIVE" if arch is None else "ODLORA_REQUIRE_ARM64") == "1"
    try:
        build_dir = DEFAULT_BUILD_DIR if arch is None else DEFAULT_BUILD_DIR.with_name(f"native-{arch}")
        return [*runner(arch), str(build(build_dir, say=lambda *_: None, arch=arch))]
    except OdloraError as e:
        if required:
            pytest.fail(f"native runtime ({request.param}) did not build or cannot run: {e}", pytrace=False)
        pytest.skip(f"native runtime ({request.param}) did not build or cannot run: {e}")


def run_native(native, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*native, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_native_greedy_equals_the_python_runtime(native, tiny_bundle, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"adapter": a, "prompt": p, "chat": c, "max_new_tokens": 12}) + "\n"
                                for a, p, c in REQUESTS))
    done = run_native(native, tiny_bundle["base"], "--adapters", tiny_bundle["extra"], "--requests", requests)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    rt = Runtime.open_bundle(tiny_bundle["base"], [tiny_bundle["extra"]], threads=1)
    for (adapter, prompt, chat), answer in zip(REQUESTS, answers, strict=True):
        expected = rt.generate(prompt, adapter=None if adapter == "base" else adapter,
                               sampling=SamplingConfig(max_new_tokens=12), chat=chat)
        assert answer["adapter"] == adapter and answer["token_ids"] == expected.token_ids, (adapter, prompt)
        assert answer["prompt_tokens"] == expected.prompt_tokens and answer["finish_reason"] == expected.finish_reason
        if "\ufffd" not in expected.text:  # a random model may stop inside a UTF-8 character
            assert answer["text"] == expected.text
    assert len({tuple(a["token_ids"]) for a in answers[:3]}) == 3, "the adapters must change the answer"


def test_a_bad_request_fails_alone(native, tiny_bundle, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"adapter": "nope", "prompt": "x"}\nnot json\n{"adapter": "a", "prompt": "x", "max_new_tokens": 2}\n')
    done = run_native(native, tiny_bundle["base"], "--requests", requests)
    first, second, third = (json.loads(line) for line in done.stdout.splitlines())
    assert done.returncode == 0 and "requests.jsonl:1: unknown adapter 'nope'" in first["error"]
    assert "requests.jsonl:2:" in second["error"] and len(third["token_ids"]) == 2


def _missing_version(copy, m):
    del m["format_version"]


@pytest.mark.parametrize("edit,message", BAD_BUNDLES + [(_missing_version, "unknown bundle format version null")])
def test_native_refuses_bad_bundles(native, tiny_bundle, tmp_path, edit, message):
    done = run_native(native, edited(tiny_bundle["base"], tmp_path, edit), "--verify")
    assert done.returncode == 2 and done.stderr.startswith("odlora-native: error: ") and message in done.stderr.splitlines()[0]


def test_native_refuses_an_adapter_bundle_for_another_base(native, tiny_bundle, tmp_path):
    other = edited(tiny_bundle["extra"], tmp_path, lambda c, m: m.update(base_fingerprint="sha256:" + "1" * 64))
    done = run_native(native, tiny_bundle["base"], "--adapters", other, "--verify")
    assert done.returncode == 2 and "packed for a different base" in done.stderr
    done = run_native(native, tiny_bundle["extra"], "--verify")
    assert done.returncode == 2 and "an adapter bundle has no base" in done.stderr


def test_kotlin_wrapper_on_the_jvm_gives_the_same_tokens(native, tiny_bundle, tmp_path):
    """apps/android's OdloraRuntime.kt, compiled with kotlinc and run on the desktop JVM against the
    JNI bridge built beside odlora-native: the same tokens as the Python runtime, errors as exceptions."""
    import shutil

    from ondevice_lora.runtime.native_build import SOURCE

    jni = Path(native[-1]).parent / "libodlora_jni.so"
    if len(native) > 1:  # cross-built: this machine's JVM cannot load it, so check what it is
        with open(jni, "rb") as f:
            header = f.read(20)
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
        pytest.skip("an ARM64 JNI bridge does not load into this machine's JVM (built and checked only)")
    kotlinc, java = shutil.which("kotlinc"), shutil.which("java")
    if not (kotlinc and java and jni.exists()):
        reason = "kotlinc, java or the JNI bridge (a JDK at build time) is missing"
        if os.environ.get("ODLORA_REQUIRE_KOTLIN") == "1":
            pytest.fail(reason + " (ODLORA_REQUIRE_KOTLIN=1)", pytrace=False)
        pytest.skip(reason)
    android = SOURCE.parents[1] / "apps" / "android"
    jar = tmp_path / "check.jar"
    compiled = subprocess.run([kotlinc, str(android / "odlora/src/main/kotlin/ai/odlora/OdloraRuntime.kt"),
                               str(android / "jvm-check/Check.kt"), "-include-runtime", "-d", str(jar)],
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    done = subprocess.run([java, f"-Djava.library.path={jni.parent}", "-cp", str(jar), "CheckKt", PROMPT,
                           str(tiny_bundle["base"]), str(tiny_bundle["extra"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    delegate, *lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert delegate == ["delegate", "xnnpack"]
    rt = Runtime.open_bundle(tiny_bundle["base"], [tiny_bundle["extra"]], threads=1)
    for adapter, tokens, finish in lines[:-1]:
        expected = rt.generate(PROMPT, adapter=None if adapter == "base" else adapter, sampling=SamplingConfig(max_new_tokens=12))
        assert [int(t) for t in tokens.split(",")] == expected.token_ids and finish == expected.finish_reason
    assert [line[0] for line in lines] == ["base", "a", "b", "error"] and "unknown adapter 'missing'" in lines[-1][1]
