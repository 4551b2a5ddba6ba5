"""A user's own prompt/completion task, trained with the defaults, answers correctly through
`odlora run`, `odlora serve` and the native runtime, on the real default base (slow).

    python -m pytest -q -s tests/test_train_as_you_serve.py

The task is one a user might bring: 50 lines of {"prompt": "Convert to 24-hour time: 7:45 pm",
"completion": "19:45"}. Before prompt formats, such an adapter learned the bare concatenation but
was asked through the chat template: 0 exact match through every runtime.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import urllib.request

import pytest

from ondevice_lora.exporters.export import pack
from ondevice_lora.runtime.bundle import write_bundle
from test_native import native  # noqa: F401 (the native build fixture)

# heavy: not yet passing. On the AVX2-only CI machine the native runtime scored 0.70 exact match
# (the bar is 0.8), and the same defaults score 0.70 in PyTorch (task_accuracy, session 6): the
# misses are the +12 of pm hours, not the prompt format.
pytestmark = [pytest.mark.slow, pytest.mark.heavy]
TRAIN_LINES, TEST_LINES = 50, 20
MIN_EXACT_MATCH = 0.8


def time_rows(n: int, seed: int) -> list[dict]:
    """`n` distinct 12-hour times and their 24-hour forms."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        hour, minute, half = rng.randint(1, 12), rng.choice(range(0, 60, 5)), rng.choice(("am", "pm"))
        if (hour, minute, half) in seen:
            continue
        seen.add((hour, minute, half))
        hour24 = hour % 12 + (12 if half == "pm" else 0)
        rows.append({"prompt": f"Convert to 24-hour time: {hour}:{minute:02d} {half}",
                     "completion": f"{hour24:02d}:{minute:02d}"})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Train (50 lines) and held-out (20 other times) rows, and an adapter trained on the first with
    the CLI's defaults."""
    root = tmp_path_factory.mktemp("first-hour")
    rows = time_rows(TRAIN_LINES + TEST_LINES, seed=7)
    train, test = rows[:TRAIN_LINES], rows[TRAIN_LINES:]
    (root / "times.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    odlora("personalize", "--data", root / "times.jsonl", "--out", root / "times")
    return {"root": root, "test": test, "adapter": root / "times"}


def odlora(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ondevice_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=1800, **kwargs)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def exact_match(answers: list[str], rows: list[dict]) -> float:
    return sum(a.strip() == r["completion"] for a, r in zip(answers, rows, strict=True)) / len(rows)


def test_run_and_serve_answer_what_the_adapter_learned(task, default_export):
    export = default_export("onnx", "int4")
    blob = task["root"] / "times.onnx_adapter"
    pack(task["adapter"], export, blob)
    requests = [r["prompt"] for r in task["test"]]
    via_run = [odlora("run", "--export", export, "--adapter", blob, "--prompt", p, "--max-new-tokens", "12").stdout
               for p in requests[:5]]
    server = subprocess.Popen([sys.executable, "-m", "ondevice_lora", "serve", "--export", str(export), "--adapter",
                               f"times={blob}", "--port", "0", "--work", str(task["root"] / "web")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"listening on (\S+)", server.stdout.readline()).group(1)
        via_serve = [chat(url, "times", p) for p in requests]
    finally:
        server.terminate()
        server.wait(30)
    print(f"exact match on {len(requests)} held-out times: serve {exact_match(via_serve, task['test']):.2f}; "
          f"run {exact_match(via_run, task['test'][:5]):.2f} on 5")
    assert [a.strip() for a in via_run] == [a.strip() for a in via_serve[:5]]
    assert exact_match(via_serve, task["test"]) >= MIN_EXACT_MATCH


def chat(url: str, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12})
    request = urllib.request.Request(f"{url}/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # serve listens once the export is loaded
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_the_native_runtime_answers_the_same(task, default_export, native, tmp_path):  # noqa: F811
    export = default_export("executorch", "fp32")
    blob = tmp_path / "times.slots"
    pack(task["adapter"], export, blob)
    write_bundle(export, [("times", blob)], tmp_path / "bundle")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"adapter": "times", "prompt": r["prompt"], "max_new_tokens": 12}) + "\n"
                                for r in task["test"]))
    done = subprocess.run([*native, str(tmp_path / "bundle"), "--requests", str(requests)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line)["text"] for line in done.stdout.splitlines()]
    print(f"native exact match on {len(answers)} held-out times: {exact_match(answers, task['test']):.2f}")
    assert exact_match(answers, task["test"]) >= MIN_EXACT_MATCH
