"""`odlora demo`: the main job end to end on the shipped sample data, on this machine.

    odlora base pull && odlora demo              # ONNX Runtime, then ExecuTorch, default base
    odlora demo --targets onnx --json            # one runtime; the summary as JSON on the last line
    odlora demo --quick                          # fewer steps and test examples, ONNX only

    base ─> personalize `dates` and `contacts` (the shipped samples) ─> two adapters
    per runtime: export the base once ─> pack both adapters for it ─> open one Runtime, register both
        ─> held-out exact match, adapter vs base (on the ONNX export: the fastest runtime here)
        ─> requests that alternate the adapters, answers printed ─> swap latency
    ─> summary: exact match, sizes, swap latency, seconds per stage

Every stage writes under --out and records what it was made from in `demo-state.json`; a rerun
reuses each output that is still valid (same base, settings and inputs; files intact), so it takes
seconds. `fresh=True` redoes everything. The runtimes run in the order given, each printing its
results before the next export starts (ExecuTorch's export is the slowest stage).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from .bounds import EXPORT_SEQ_LEN, LR, POSITIVE_INT, RANK, SEED, THREADS, check_fields
from .config import DEFAULT_BASE_QUANT, MIN_DEFAULT_STEPS, LoraConfig, PersonalizeConfig, TrainConfig, default_of
from .errors import OdloraError
from .formats.manifest import read_manifest, sha256_file
from .formats.schemas import DemoState, read_json, to_dict
from .formats.slots import DEFAULT_MAX_RANK, PROJECTIONS
from .formats.targets import target as find_target
from .quiet import quiet
from .samples import SAMPLE_TASKS, exact_match, load_examples, sample_path

STATE = "demo-state.json"
TARGETS = ("onnx", "executorch")  # the runtimes that run here (Core ML needs macOS)
# Per runtime, the base's quantisation: each runtime's fastest, on the default base's own Q4_1 grid
# (ONNX int4; ExecuTorch 8da4w, the export the native runtime ships: 108 MB against fp32's 547).
EXPORT_QUANT = {"onnx": "int4", "executorch": "8da4w"}
ANSWER_MARGIN = 4  # tokens past the reference's length: a longer answer cannot match, so stop there


@dataclass
class DemoConfig:
    base: Optional[str] = None  # None: the default base
    out: Path = Path("odlora-demo")
    targets: tuple[str, ...] = TARGETS
    tasks: tuple[str, ...] = SAMPLE_TASKS
    # Training: 40 steps of 8 x 128 tokens take the default base on `dates` from val loss 0.93 to
    # 0.03 and exact match from 0.00 to 0.80 (rank 8, all linears, int8 base).
    steps: int = MIN_DEFAULT_STEPS
    rank: int = default_of(LoraConfig, "rank")
    base_quant: str = DEFAULT_BASE_QUANT["torch"]  # how the frozen base is held while training
    lr: float = default_of(TrainConfig, "lr")
    seed: int = default_of(TrainConfig, "seed")
    # Export: the demo's prompts are under 100 tokens, so a 256-token KV cache is plenty.
    quant: dict = field(default_factory=lambda: dict(EXPORT_QUANT))
    max_rank: int = DEFAULT_MAX_RANK
    max_seq_len: int = 256
    # Measurement.
    eval_examples: int = 40  # held-out test examples per task, base and adapter each
    requests: int = 2  # requests per task in the alternating run
    swaps: int = 100
    threads: Optional[int] = None  # None: every core
    fresh: bool = False

    def validate(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise OdloraError(f"choose from {', '.join(TARGETS)} (got {','.join(self.targets) or 'none'})", param="targets")
        strangers = sorted(set(self.quant) - set(TARGETS))
        if strangers:
            raise OdloraError(f"--quant {strangers[0]}={self.quant[strangers[0]]}: {strangers[0]!r} is not a runtime "
                              f"(choose from {', '.join(TARGETS)})")
        for target in self.targets:
            quants = find_target(target).quants
            if self.quant.get(target) not in quants:
                raise OdloraError(f"--quant {target}={self.quant.get(target)}: choose from {', '.join(quants)}")
        for task in self.tasks:
            sample_path(task)  # ValueError on an unknown task
        check_fields(self, {"steps": POSITIVE_INT, "eval_examples": POSITIVE_INT, "threads": THREADS, "rank": RANK,
                            "max_rank": RANK, "max_seq_len": EXPORT_SEQ_LEN, "lr": LR, "seed": SEED,
                            "requests": POSITIVE_INT, "swaps": POSITIVE_INT})


def quick(cfg: DemoConfig) -> DemoConfig:
    """A first look: ONNX only, half the steps and test examples (the adapters beat the base less clearly)."""
    return replace(cfg, targets=("onnx",), steps=max(1, cfg.steps // 2), eval_examples=max(1, cfg.eval_examples // 2))


# -- stages: run, or reuse what a previous run left -------------------------------------------------

class Stages:
    """Runs named stages in order, printing a line as each starts and ends (with its elapsed time).

    A stage's output is reused when `demo-state.json` holds a result for the same key (everything it
    was made from) and `valid(result)` still holds for the files on disk.
    """

    def __init__(self, out: Path, total: int, fresh: bool, say: Callable[[str], None]):
        self.path, self.total, self.say = out / STATE, total, say
        self.state = {} if fresh else _read_state(self.path)
        self.timings: dict[str, dict] = {}

    def run(self, name: str, key: dict, make: Callable[[], dict], valid: Callable[[dict], bool] = lambda r: True,
            describe: Callable[[dict], str] = lambda r: "") -> dict:
        """`make()`'s result, or the recorded one when its key matches and it is still valid."""
        started = time.perf_counter()
        prior = self.state.get(name)
        if prior is not None and prior.get("key") == _jsonable(key) and _holds(valid, prior.get("result")):
            return self._done(name, prior["result"], started, describe, reused=True)
        self.state.pop(name, None)
        self._save()
        result = self._start(name, make)
        self.state[name] = {"key": _jsonable(key), "result": _jsonable(result)}
        self._save()
        return self._done(name, result, started, describe, reused=False)

    def live(self, name: str, make: Callable[[], dict], describe: Callable[[dict], str] = lambda r: "") -> dict:
        """A stage that always runs (checks and measurements of this run)."""
        started = time.perf_counter()
        return self._done(name, self._start(name, make), started, describe, reused=False)

    def _start(self, name: str, make: Callable[[], dict]) -> dict:
        self.say(f"[{len(self.timings) + 1}/{self.total}] {name} ...")
        return make()

    def _done(self, name: str, result: dict, started: float, describe, reused: bool) -> dict:
        seconds = time.perf_counter() - started
        self.timings[name] = {"seconds": round(seconds, 1), "reused": reused}
        note = describe(result)
        self.say(f"[{len(self.timings)}/{self.total}] {name}: {'reused, ' if reused else ''}{note}"
                 f"{'  ' if note else ''}({clock(seconds)})")
        return result

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(self.path)


def _holds(valid, result) -> bool:
    try:
        return result is not None and bool(valid(result))
    except (OSError, OdloraError, KeyError, ValueError, TypeError):
        return False


def _read_state(path: Path) -> dict:
    """The recorded stages; none before the first run. A damaged file is an error, not a silent
    redo of every stage: --fresh is how to start over."""
    try:
        return to_dict(read_json(path, DemoState))
    except FileNotFoundError:
        return {}
    except OdloraError as e:
        raise OdloraError(f"{e} (--fresh ignores it and redoes every stage)") from None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


@contextlib.contextmanager
def heartbeat(say: Callable[[str], None], what: str, every: float = 60.0):
    """Print `what ... m:ss` every `every` seconds while the block runs (for the slow exports)."""
    done, started = threading.Event(), time.perf_counter()

    def tick():
        while not done.wait(every):
            say(f"      ... {what} ({clock(time.perf_counter() - started)})")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def quiet_toolchain():
    """Hide the export toolchain's deprecation warnings and torchao's missing-GPU-kernel notices
    (what `odlora export` users see is no news to a demo's reader)."""
    return quiet(("torchao", "torch.utils._pytree"))


# -- the stages -------------------------------------------------------------------------------------

def personalize_stage(cfg: DemoConfig, task: str, say) -> dict:
    from .personalization import personalize

    out = cfg.out / "adapters" / task
    training = TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, eval_every=0, save_every=0)
    pcfg = PersonalizeConfig(base=cfg.base, base_quant=cfg.base_quant, threads=cfg.threads, training=training,
                             lora=LoraConfig(rank=cfg.rank))
    every = max(1, cfg.steps // 4)

    def progress(record: dict, total: int) -> None:
        if record["step"] % every == 0 or record["step"] == total:
            say(f"      step {record['step']}/{total}  loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tokens/s")

    metrics = personalize(pcfg, sample_path(task, "train"), out, say=lambda m: say(f"      {m}"), progress=progress,
                          force=True)  # the demo's own output, redone because it is no longer valid
    return {"dir": str(out), "sha256": sha256_file(out / "adapter_model.safetensors"),
            "val_loss_before": metrics["val_loss_before"], "val_loss": metrics["val_loss"], "steps": metrics["steps"],
            "train_seconds": round(metrics["seconds"], 1), "tokens_per_s": round(metrics["tokens_per_s"], 1)}


def adapter_valid(result: dict) -> bool:
    return sha256_file(Path(result["dir"]) / "adapter_model.safetensors") == result["sha256"] \
        and (Path(result["dir"]) / "odlora.json").is_file()


def export_stage(cfg: DemoConfig, target: str, say) -> dict:
    from .exporters.export import export

    out = cfg.out / "exports" / target
    if target == "executorch":
        say("      ExecuTorch lowers every layer in single-threaded Python: the slowest stage (8da4w: measured "
            "5.5 minutes for the default base's 30 layers on a 2-core EPYC)")
    with heartbeat(say, f"still exporting to {target}"), quiet_toolchain():
        manifest = export(cfg.base, target, out, cfg.quant[target], cfg.max_rank, PROJECTIONS,
                          cfg.max_seq_len, force=True, say=lambda m: say(f"      {m}"))
    return {"dir": str(out), "manifest_sha256": sha256_file(out / "manifest.json"), "quant": manifest["quant"],
            "files": {name: entry["size"] for name, entry in manifest["files"].items()},
            "export_seconds": manifest["export_seconds"]}


def export_valid(result: dict) -> bool:
    """The manifest is the one recorded and every file it lists has its size (the runtime checks
    the checksums when it opens the export)."""
    root = Path(result["dir"])
    if sha256_file(root / "manifest.json") != result["manifest_sha256"]:
        return False
    manifest = read_manifest(root, verify=False)
    return all((root / name).is_file() and (root / name).stat().st_size == entry["size"]
               for name, entry in manifest["files"].items())


def pack_stage(cfg: DemoConfig, target: str, adapters: dict, export: dict) -> dict:
    from .exporters.export import pack

    blobs = {}
    for task, adapter in adapters.items():
        blob = cfg.out / "packed" / target / f"{task}{find_target(target).blob_suffix}"
        info = pack(Path(adapter["dir"]), Path(export["dir"]), blob, force=True)  # the demo's own, redone
        blobs[task] = {"file": str(blob), "size": info["size"], "sha256": info["sha256"]}
    return blobs


def packs_valid(result: dict) -> bool:
    return all(Path(b["file"]).is_file() and Path(b["file"]).stat().st_size == b["size"]
               and sha256_file(Path(b["file"])) == b["sha256"] for b in result.values())


def task_answers(rt, examples: list[dict], adapter: Optional[str]) -> list[str]:
    """Greedy answers to chat examples (their last turn held back as the reference), each cut
    a few tokens past its reference's length."""
    from .config import SamplingConfig

    return [rt.generate(ex["messages"][:-1], adapter=adapter,
                        sampling=SamplingConfig(max_new_tokens=answer_budget(rt, ex["messages"][-1]["content"]))).text
            for ex in examples]


def held_out(rt, tasks, n: int, say) -> dict:
    """Exact match on each task's first `n` test examples, adapter vs base, greedy."""
    results = {}
    for task in tasks:
        started = time.perf_counter()
        examples = load_examples(task, "test")[:n]
        prompts = [ex["messages"][:-1] for ex in examples]
        references = [ex["messages"][-1]["content"] for ex in examples]
        answers = {name: task_answers(rt, examples, adapter) for name, adapter in (("base", None), ("adapter", task))}
        results[task] = {"examples": len(examples), "base": exact_match(answers["base"], references),
                         "adapter": exact_match(answers["adapter"], references),
                         "samples": [{"prompt": p[-1]["content"], "expected": r, "base": b, "adapter": a}
                                     for p, r, b, a in list(zip(prompts, references, answers["base"], answers["adapter"]))[:3]]}
        say(f"      {task}: exact match base {results[task]['base']:.2f} -> adapter {results[task]['adapter']:.2f} "
            f"on {len(examples)} test examples ({clock(time.perf_counter() - started)})")
    return results


def held_out_key(blobs: dict, export: dict, cfg: DemoConfig) -> dict:
    return {"export": export["manifest_sha256"], "blobs": {t: b["sha256"] for t, b in blobs.items()},
            "examples": cfg.eval_examples, "margin": ANSWER_MARGIN,
            "test": {t: sha256_file(sample_path(t, "test")) for t in blobs}}


def answer_budget(rt, reference: str) -> int:
    return len(rt.tokenizer.encode(reference, add_special_tokens=False)) + ANSWER_MARGIN


def alternate_requests(rt, tasks, per_task: int, say) -> list[dict]:
    """Requests that switch adapter every time, then the first prompt of each task on the base."""
    from .config import SamplingConfig

    examples = {task: load_examples(task, "test") for task in tasks}
    order = [(task, i, task) for i in range(per_task) for task in tasks] + [(task, 0, None) for task in tasks]
    answers = []
    for task, i, adapter in order:
        ex = examples[task][-1 - i]  # from the end of the test split: outside the scored examples
        expected = ex["messages"][-1]["content"]
        result = rt.generate(ex["messages"][:-1], adapter=adapter, sampling=SamplingConfig(max_new_tokens=32))
        answers.append({"task": task, "adapter": adapter or "base", "prompt": ex["messages"][-2]["content"],
                        "answer": result.text, "expected": expected, "match": result.text.strip() == expected.strip(),
                        "tokens": len(result.token_ids), "seconds": round(result.seconds, 3)})
        verdict = "exact" if answers[-1]["match"] else f"expected {expected}"
        say(f"      {adapter or 'base':>8} | {one_line(answers[-1]['prompt'])}")
        say(f"      {'':>8} > {one_line(result.text)}   ({verdict}; {result.seconds:.2f} s)")
    return answers


def one_line(text: str, width: int = 70) -> str:
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= width else text[:width - 3] + "..."


def swap_latency(rt, ids: list[str], n: int) -> dict:
    """Switch between registered adapters `n` times on one loaded base, each switch followed by a
    request that keeps the adapter.

    What is timed is what a request does before its first token: look its adapter up in the
    runtime's cache and bind it to a new sequence (ONNX Runtime: its slot inputs bound
    with a fresh KV cache; ExecuTorch: its slot tensors as the method's inputs).
    Keeping one adapter times the same path without a switch, so the difference is what a switch
    costs. The decode step after each is timed apart, to show any cost a switch leaves in it.
    """
    def step(adapter_id: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        loaded, _ = rt.resolve_adapter(adapter_id)  # the runtime's own lookup, as in generate()
        with rt.backend.sequence(loaded) as seq:
            t1 = time.perf_counter()
            seq.forward([token], 0)
        return t1 - t0, time.perf_counter() - t1

    token = rt.encode("Hi", chat=False)[0]
    for adapter_id in ids:  # warm both adapters and the backend
        step(adapter_id)
    swapped, kept = [], []
    for k in range(n):  # switch, keep, switch, keep ...: both see the same machine load
        swapped.append(step(ids[(k + 1) % len(ids)]))
        kept.append(step(ids[(k + 1) % len(ids)]))
    (swap_bind, swap_step), (same_bind, same_step) = zip(*swapped), zip(*kept)
    ms = lambda xs, q=0.5: round(1e3 * quantile(xs, q), 3)  # noqa: E731
    return {"swaps": n, "swap_ms_p50": ms(swap_bind), "swap_ms_p99": ms(swap_bind, 0.99),
            "same_adapter_ms_p50": ms(same_bind), "same_adapter_ms_p99": ms(same_bind, 0.99),
            "step_ms_after_swap_p50": ms(swap_step), "step_ms_same_adapter_p50": ms(same_step)}


def quantile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


class LiveRuntime:
    """One Runtime per export, opened on first use and shared by the held-out score and the requests:
    the base loads once; both adapters register on it (their cold load timed)."""

    def __init__(self, cfg: DemoConfig, target: str, export: dict, blobs: dict, say):
        self.cfg, self.target, self.export, self.blobs, self.say = cfg, target, export, blobs, say
        self.rt, self.open_seconds, self.cold_load_ms = None, None, {}

    def get(self):
        if self.rt is None:
            from .runtime import Runtime

            started = time.perf_counter()
            self.rt = Runtime.open(self.export["dir"], threads=self.cfg.threads)
            self.open_seconds = round(time.perf_counter() - started, 2)
            for task, blob in self.blobs.items():
                t0 = time.perf_counter()
                self.rt.register_adapter(task, blob["file"])  # checks the sidecar and checksum, loads the blob
                self.cold_load_ms[task] = round(1e3 * (time.perf_counter() - t0), 1)
            self.say(f"      opened the {self.target} export in {self.open_seconds:.1f} s; registered "
                     + ", ".join(f"{t} (cold load {ms:.0f} ms)" for t, ms in self.cold_load_ms.items()))
        return self.rt


def requests_stage(cfg: DemoConfig, live: LiveRuntime, say) -> dict:
    rt = live.get()
    requests = alternate_requests(rt, list(live.blobs), cfg.requests, say)
    swap = swap_latency(rt, list(live.blobs), cfg.swaps)
    stats = rt.stats()
    say(f"      {swap['swaps']} adapter switches: p50 {swap['swap_ms_p50']:.3f} ms, p99 {swap['swap_ms_p99']:.3f} ms "
        f"(keeping one adapter: p50 {swap['same_adapter_ms_p50']:.3f} ms); the decode step after a switch "
        f"{swap['step_ms_after_swap_p50']:.1f} ms, without {swap['step_ms_same_adapter_p50']:.1f} ms; "
        f"adapters read from disk: {stats['adapter_loads']}")
    live.rt = None  # let the base go before the next runtime's export
    return {"open_seconds": live.open_seconds, "cold_load_ms": live.cold_load_ms, "requests": requests, "swap": swap,
            "adapter_loads": stats["adapter_loads"], "cache_hits": stats["cache_hits"]}


# -- the whole job ----------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print, show: Optional[Callable[[str], None]] = None) -> dict:
    """Run every stage (reusing valid outputs under cfg.out); returns the summary.

    `say` gets the progress lines; `show` (default: `say`) the results of each runtime but the
    last as soon as they are in, so that a slow later export does not hold them back.
    """
    from .base import load_base

    show = show or say
    cfg.validate()
    cfg.out = Path(cfg.out)
    started = time.perf_counter()
    eval_target = "onnx" if "onnx" in cfg.targets else cfg.targets[0]
    stages = Stages(cfg.out, 1 + len(cfg.tasks) + 3 * len(cfg.targets) + 1, cfg.fresh, say)
    say(f"odlora demo: adapters for {', '.join(cfg.tasks)} on {cfg.base or 'the default base'}; "
        f"runtimes {', '.join(cfg.targets)}; output in {cfg.out}")

    def load_checked_base() -> dict:
        base = load_base(cfg.base)
        return {"spec": base.spec, "fingerprint": base.fingerprint, "parameters": base.n_params}

    base = stages.live("base", load_checked_base, lambda r: f"{r['spec']} ({r['parameters'] / 1e6:.1f}M parameters)")
    adapters = {}
    for task in cfg.tasks:
        key = {"base": base["fingerprint"], "data": sha256_file(sample_path(task, "train")), "steps": cfg.steps,
               "rank": cfg.rank, "base_quant": cfg.base_quant, "lr": cfg.lr, "seed": cfg.seed, "targets": "all-linear"}
        adapters[task] = stages.run(
            f"personalize {task}", key, lambda task=task: personalize_stage(cfg, task, say), adapter_valid,
            lambda r: f"val loss {r['val_loss_before']:.3f} -> {r['val_loss']:.3f} in {r['steps']} steps")
    summary = {"base": base, "config": _jsonable({k: v for k, v in asdict(cfg).items() if k != "fresh"}),
               "adapters": adapters, "held_out": None, "held_out_runtime": eval_target, "runtimes": {}}
    for target in cfg.targets:
        key = {"base": base["fingerprint"], "target": target, "quant": cfg.quant[target], "max_rank": cfg.max_rank,
               "max_seq_len": cfg.max_seq_len}
        export = stages.run(f"export {target}", key, lambda target=target: export_stage(cfg, target, say),
                            export_valid, lambda r: f"{r['quant']}, {mb(sum(r['files'].values()))}")
        key = {"export": export["manifest_sha256"], "adapters": {t: a["sha256"] for t, a in adapters.items()}}
        blobs = stages.run(f"pack {target}", key, lambda target=target, export=export: pack_stage(cfg, target, adapters, export),
                           packs_valid, lambda r: ", ".join(f"{t} {mb(b['size'])}" for t, b in r.items()))
        live = LiveRuntime(cfg, target, export, blobs, say)
        if target == eval_target:
            summary["held_out"] = stages.run(
                f"held-out exact match ({target})", held_out_key(blobs, export, cfg),
                lambda live=live: held_out(live.get(), list(blobs), cfg.eval_examples, say),
                describe=lambda r: "; ".join(f"{t} {v['base']:.2f} -> {v['adapter']:.2f}" for t, v in r.items()))
        result = stages.live(f"requests {target}", lambda live=live: requests_stage(cfg, live, say),
                             lambda r: f"{len(r['requests'])} requests, swap p50 {r['swap']['swap_ms_p50']:.3f} ms")
        summary["runtimes"][target] = {
            "quant": export["quant"], "export_dir": export["dir"], "export_bytes": sum(export["files"].values()),
            "export_files": export["files"], "export_seconds": export["export_seconds"],
            "packed": {t: {"file": b["file"], "bytes": b["size"]} for t, b in blobs.items()}, **result}
        summary["stages"], summary["seconds"] = stages.timings, round(time.perf_counter() - started, 1)
        if target != cfg.targets[-1]:
            show("\n" + format_summary(summary, final=False) + "\n")
    return summary


# -- the summary table --------------------------------------------------------------------------------

def held_target(s: dict) -> str:
    target = s["held_out_runtime"]
    return f"{target} {s['runtimes'].get(target, {}).get('quant', '')}".strip()


def format_summary(s: dict, final: bool = True) -> str:
    """The summary as a few small tables; `final=False` for the results so far, mid-run."""
    cfg, tasks = s["config"], list(s["adapters"])
    lines = [f"== odlora demo: {s['base']['spec']}, rank-{cfg['rank']} adapters ({cfg['steps']} steps each), "
             f"{clock(s['seconds'])} {'in all' if final else 'so far'} =="]
    if s.get("held_out"):
        lines += ["", f"held-out exact match ({held_target(s)} export, greedy, first {cfg['eval_examples']} test "
                      f"examples per task):"]
        lines += table([["task", "base", "adapter", "val loss before -> after"]] + [
            [task, f"{r['base']:.2f}", f"{r['adapter']:.2f}",
             f"{s['adapters'][task]['val_loss_before']:.3f} -> {s['adapters'][task]['val_loss']:.3f}"]
            for task, r in s["held_out"].items()])
    if s["runtimes"]:
        lines += ["", "runtimes (one base loaded once each; the adapters switched per request; times in ms):"]
        rows = [["runtime", "export", "packed " + " / ".join(tasks), "cold load", "swap p50 / p99", "no swap p50",
                 "decode step swap / no swap"]]
        for target, r in s["runtimes"].items():
            sw = r["swap"]
            rows.append([f"{target} {r['quant']}", mb(r["export_bytes"]),
                         " / ".join(mb(r["packed"][t]["bytes"]) for t in tasks),
                         " / ".join(f"{r['cold_load_ms'][t]:.0f}" for t in tasks),
                         f"{sw['swap_ms_p50']:.2f} / {sw['swap_ms_p99']:.2f}", f"{sw['same_adapter_ms_p50']:.2f}",
                         f"{sw['step_ms_after_swap_p50']:.1f} / {sw['step_ms_same_adapter_p50']:.1f}"])
        lines += table(rows)
    lines += ["", "stages (m:ss): " + "; ".join(f"{name} {clock(t['seconds'])}{' reused' if t['reused'] else ''}"
                                                for name, t in s["stages"].items())]
    return "\n".join(lines)


def table(rows: list[list[str]], left: int = 1) -> list[str]:
    """The first `left` columns left-aligned (text), the others right-aligned (figures), two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]
