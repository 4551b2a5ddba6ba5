"""The `odlora` command line. It only parses flags and calls library functions.

    odlora base pull
    odlora demo                                         # all of the below on the shipped sample data
    odlora generate --prompt "What is the capital of France?"
    odlora personalize --data dates.jsonl --out adapters/dates
    odlora generate --adapter adapters/dates --prompt "Normalise: March 5th, 2021"
    odlora export --target onnx --out exports/onnx
    odlora adapter pack adapters/dates --export exports/onnx --out dates.onnx_adapter
    odlora run --export exports/onnx --adapter dates.onnx_adapter --prompt "Normalise: March 5th, 2021"
    odlora serve --export exports/onnx --adapter dates=dates.onnx_adapter      # OpenAI's API on 127.0.0.1:8000
    odlora chat --export exports/onnx --adapter dates=dates.onnx_adapter
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import click

from . import bounds
from .cli_types import EXISTING_DIR, Bounded, Utf8Text, WeightedPath, click_error_line
from .errors import OdloraError
from .formats.slots import DEFAULT_MAX_RANK
from .formats.targets import DEFAULT_MAX_SEQ_LEN, TARGETS
from .registry import DEFAULT_BASE

BASE_HELP = f"A Hugging Face model directory, a .gguf file or a registered name (default: {DEFAULT_BASE})."


def base_option(f):
    return click.option("--base", "base", default=DEFAULT_BASE, show_default=True, help=BASE_HELP)(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on the last line.")(f)


def sampling_options(f):
    """The generation flags shared by `generate`, `run` and `chat`, handed to the command as one
    checked `sampling` (a SamplingConfig), so that bad values fail before anything loads."""
    options = [
        click.option("--max-new-tokens", default=128, show_default=True, type=Bounded(bounds.POSITIVE_INT)),
        click.option("--temperature", default=0.0, show_default=True, type=Bounded(bounds.TEMPERATURE),
                     help="0 means greedy; at most 2."),
        click.option("--top-k", default=0, show_default=True, type=Bounded(bounds.NON_NEGATIVE_INT),
                     help="Sample from the k most likely tokens (0: all)."),
        click.option("--top-p", default=1.0, show_default=True, type=Bounded(bounds.TOP_P), help="Nucleus sampling mass."),
        click.option("--seed", default=None, type=Bounded(bounds.SEED), help="Seed for sampling (same seed, same text)."),
        click.option("--stop", multiple=True, type=Utf8Text(), help="Stop when this text appears (repeatable)."),
    ]

    @functools.wraps(f)
    def command(*args, max_new_tokens, temperature, top_k, top_p, seed, stop, **kwargs):
        from .generate import SamplingConfig

        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, list(stop))
        sampling.validate()
        return f(*args, sampling=sampling, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def chat_option(f):
    return click.option("--chat/--no-chat", "chat", default=None,
                        help="Wrap the prompt in the chat template, or feed it as raw text (default: the way the "
                             "adapter was trained, `personalize --format`; the chat template for the base).")(f)


def asks_chat(trained: str, chat: Optional[bool], adapter_name: str) -> bool:
    """Whether to use the chat template: as the adapter was trained unless --chat/--no-chat says
    otherwise, which then gets a one-line warning on stderr."""
    from .prompts import format_mismatch

    asked = trained if chat is None else ("chat" if chat else "raw")
    warning = format_mismatch(adapter_name, trained, asked)
    if warning:
        click.echo(f"odlora: warning: {warning}", err=True)
    return asked == "chat"


def export_option(f):
    return click.option("--export", "export_dir", required=True, type=EXISTING_DIR,
                        help="An `odlora export` directory, or an app bundle (`odlora bundle`) with its adapters.")(f)


def backend_option(f):
    return click.option("--backend", default=None, type=click.Choice([*TARGETS, "torch"]),
                        help="Default: the export's target; torch runs the PyTorch reference of the exported graph.")(f)


def named_adapters_option(f):
    """`--adapter [ID=]FILE` for the commands that serve several adapters by id (`serve`, `chat`)."""
    return click.option("--adapter", "adapters", multiple=True, metavar="[ID=]FILE",
                        help="Packed adapter blob (`odlora adapter pack`) offered as ID (default: the file's stem); "
                             "repeatable.")(f)


def write_stdout(piece: str) -> None:
    """Stream generated text as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def print_fields(info: dict) -> None:
    for key, value in info.items():
        click.echo(f"{key:>22}: {value}")


def load_weighted_adapters(specs, fingerprint: str):
    """Load (DIR, weight) adapters (`--adapter DIR[:W]`), check each against the base, and blend them into one."""
    from .adapter import blend, check_base, load_adapter

    weighted = []
    for path, weight in specs:
        adapter = load_adapter(Path(path))
        check_base(adapter, fingerprint, path)
        weighted.append((adapter, weight))
    return blend(weighted)


def open_runtime(export_dir: Path, backend: Optional[str]):
    """A Runtime on an export directory, or on a bundle with its adapters registered by id."""
    from .runtime import Runtime
    from .runtime.bundle import BUNDLE_MANIFEST

    if (Path(export_dir) / BUNDLE_MANIFEST).exists():
        return Runtime.open_bundle(export_dir, backend=backend)
    return Runtime.open(export_dir, backend=backend)


def register_blobs(rt, specs) -> list[str]:
    """Register packed blobs given as `FILE` or `ID=FILE` with a Runtime; returns their ids in order.

    Without ID a blob's id is its file's stem, made unique ("a", "a-2"); the same file named twice
    keeps one id, so `run --adapter a.blob --adapter a.blob:0.5` blends one adapter with itself.
    Requests write blends as `a:0.7+b:0.3` and the model without adapters as `base`, so ids avoid both.
    """
    registered: dict[str, Path] = {}  # id -> resolved blob
    ids = []
    for spec in specs:
        name, path = split_id(spec)
        blob = Path(path).resolve()
        if name is None:
            same = [i for i, b in registered.items() if b == blob]
            name = same[0] if same else unique_id(Path(path).stem, registered)
        elif registered.get(name, blob) != blob:
            raise OdloraError(f"adapter id {name!r} names two files")
        if name not in registered:
            check_id(name)
            rt.register_adapter(name, blob)
            registered[name] = blob
        ids.append(name)
    return ids


def split_id(spec: str) -> tuple[Optional[str], str]:
    """`ID=FILE` -> (ID, FILE); `FILE` (even one with "=" in its name) -> (None, FILE)."""
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, path
    return None, spec


def unique_id(stem: str, taken) -> str:
    name, n = stem, 1
    while name in taken or name == "base":
        n += 1
        name = f"{stem}-{n}"
    return name


def check_id(name: str) -> None:
    if name == "base" or ":" in name or "+" in name:
        raise OdloraError(f"adapter id {name!r}: `base` names the model without adapters and ':' '+' write blends; "
                          f"choose another id with --adapter ID=FILE")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ondevice-lora")
def cli():
    """On-device personalisation with LoRA: train adapters on a frozen base, export it once, swap adapters."""


# -- bases ------------------------------------------------------------------------------------

@cli.group()
def base():
    """Fetch and inspect base models."""


@base.command("pull")
@click.argument("name", default=DEFAULT_BASE)
def base_pull(name):
    """Download and convert a registered base (the only command that uses the network).

    Prints the local directory of the converted base.
    """
    from . import registry

    click.echo(str(registry.pull(name, progress=lambda msg: click.echo(msg, err=True))))


@base.command("info")
@click.argument("base_spec", metavar="BASE", default=DEFAULT_BASE)
@json_option
def base_info(base_spec, as_json):
    """Architecture, parameter count, dtype, fingerprint and size of BASE."""
    from .base import describe_base, load_base

    info = describe_base(load_base(base_spec))
    click.echo(json.dumps(info)) if as_json else print_fields(info)


# -- generation -------------------------------------------------------------------------------

@cli.command()
@base_option
@click.option("--prompt", required=True, type=Utf8Text(), help="The user's text.")
@click.option("--adapter", "adapters", multiple=True, metavar="DIR[:WEIGHT]", type=WeightedPath(),
              help="LoRA adapter directory, optionally with a strength; repeat to blend several.")
@sampling_options
@chat_option
def generate(base, prompt, adapters, chat, sampling):
    """Generate a completion for PROMPT; prints only the completion, streamed."""
    from .adapter import attach_adapter
    from .base import load_base
    from .generate import generate_text
    from .prompts import DEFAULT_PROMPT_FORMAT, encode_prompt, stop_token_ids

    loaded = load_base(base)
    trained = DEFAULT_PROMPT_FORMAT
    if adapters:
        adapter = load_weighted_adapters(adapters, loaded.fingerprint)
        attach_adapter(loaded.model, adapter)
        trained = adapter.prompt_format
    named = " + ".join(path for path, _ in adapters) or "base"
    ids = encode_prompt(loaded.tokenizer, prompt, chat=asks_chat(trained, chat, named))
    generate_text(loaded.model, loaded.tokenizer, ids, sampling, stop_token_ids(loaded.tokenizer, loaded.config),
                  write_stdout)
    sys.stdout.write("\n")


# -- personalisation --------------------------------------------------------------------------

@cli.command()
@base_option
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help=".txt, .jsonl ({text} | {prompt, completion} | {messages}), a directory of them, or a shipped "
                   "sample by name (dates, contacts; dates:test for its test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write (PEFT format).")
@click.option("--rank", default=8, show_default=True, type=Bounded(bounds.RANK))
@click.option("--alpha", default=None, type=Bounded(bounds.ALPHA), help="LoRA scale numerator (scale alpha/rank).  [default: 2 x rank]")
@click.option("--dropout", default=0.0, show_default=True, type=Bounded(bounds.DROPOUT))
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--targets", default="all-linear", show_default=True,
              help="qv | attn | all-linear | comma-separated module names (q_proj,v_proj,...).")
@click.option("--layers", default="all", show_default=True, help="all | middle | A-B | i,j,k")
@click.option("--base-quant", default=None, type=click.Choice(["none", "int8", "int4"]),
              help="How the frozen base is held while training (default: int8; none with --engine executorch).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="Compute dtype; auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX, ARM64), "
                   "else fp32, which is much faster there; fp32 with --engine executorch.")
@click.option("--engine", default="torch", show_default=True, type=click.Choice(["torch", "executorch"]),
              help="torch: PyTorch autograd (laptop); executorch: an exported ExecuTorch training program (device).")
@click.option("--program", default=None, type=EXISTING_DIR,
              help="--engine executorch: a program from `odlora export --trainable` (default: exported once, cached).")
@click.option("--format", "prompt_format", default="chat", show_default=True, type=click.Choice(["chat", "raw"]),
              help="How prompt/completion rows are rendered: chat (one user turn and the answer, through the "
                   "base's chat template, as run/serve/chat ask by default) or raw (prompt + completion "
                   "concatenated). Recorded in the adapter; the runtimes ask it the same way.")
@click.option("--steps", default=None, type=Bounded(bounds.POSITIVE_INT), help="Optimiser steps (overrides --epochs).")
@click.option("--epochs", default=None, type=Bounded(bounds.EPOCHS),
              help="Passes over the data (default: 3, but at least 40 steps and at most 20 passes).")
@click.option("--lr", default=1e-3, show_default=True, type=Bounded(bounds.LR))
@click.option("--batch-size", default=8, show_default=True, type=Bounded(bounds.POSITIVE_INT))
@click.option("--grad-accum", default=1, show_default=True, type=Bounded(bounds.POSITIVE_INT))
@click.option("--seq-len", default=128, show_default=True, type=Bounded(bounds.SEQ_LEN),
              help="Tokens per packed row (at most the base's context).")
@click.option("--val-split", default=0.1, show_default=True, type=Bounded(bounds.VAL_SPLIT))
@click.option("--val-data", default=None, type=click.Path(path_type=Path), help="Held-out data instead of a split.")
@click.option("--train-on-prompt", is_flag=True, help="Also train on prompt / user tokens.")
@click.option("--seed", default=0, show_default=True, type=Bounded(bounds.SEED))
@click.option("--eval-every", default=50, show_default=True, type=Bounded(bounds.NON_NEGATIVE_INT),
              help="Validate every N steps (0: start and end).")
@click.option("--save-every", default=100, show_default=True, type=Bounded(bounds.NON_NEGATIVE_INT),
              help="Checkpoint every N steps (0: never).")
@click.option("--early-stopping", default=0, show_default=True, type=Bounded(bounds.NON_NEGATIVE_INT),
              help="Stop after N validations without improvement (0: never).")
@click.option("--activation-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--compile", "compile_layers", is_flag=True,
              help="Compile the decoder layers with TorchInductor: faster steps after a one-off compile "
                   "(needs a C++ compiler; pays off on longer runs).")
@click.option("--threads", default=None, type=Bounded(bounds.THREADS), help="CPU threads (default: all cores).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an interrupted run with the same --out.")
@click.option("--force", is_flag=True, help="Replace the adapter at --out (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Print the modules LoRA would adapt and the data statistics, then stop.")
@json_option
def personalize(base, data, out, rank, alpha, dropout, rslora, targets, layers, base_quant, dtype, engine, program,
                prompt_format, steps, epochs, lr, batch_size, grad_accum, seq_len, val_split, val_data, train_on_prompt, seed,
                eval_every, save_every, early_stopping, activation_checkpointing, compile_layers, threads, resume, force,
                dry_run, as_json):
    """Train a LoRA adapter on local data against a frozen, quantised base."""
    from .lora import LoraConfig, parse_targets
    from .personalize import PersonalizeConfig, dry_run as personalize_dry_run, format_dry_run, personalize as run
    from .progress import TrainingProgress
    from .train import TrainConfig

    training = TrainConfig(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                           eval_every=eval_every, save_every=save_every, early_stopping=early_stopping,
                           activation_checkpointing=activation_checkpointing, compile=compile_layers)
    cfg = PersonalizeConfig(base=base, training=training, seq_len=seq_len, val_split=val_split, val_data=val_data,
                            base_quant=base_quant or ("none" if engine == "executorch" else "int8"),
                            dtype=dtype, engine=engine, program=program,
                            train_on_prompt=train_on_prompt, prompt_format=prompt_format, threads=threads,
                            layers=layers, lora=LoraConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=rslora,
                                                           targets=parse_targets(targets)))
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if dry_run:
        info = personalize_dry_run(cfg, data)
        click.echo(json.dumps(info) if as_json else format_dry_run(info))
        return
    from .exporters.export import cached_training_program

    with TrainingProgress() as progress:
        metrics = run(cfg, data, out, resume=resume, say=say, progress=progress.update, force=force,
                      program_exporter=cached_training_program)
    summary = {k: v for k, v in metrics.items() if k != "val_history"}
    say(f"saved {out}: val loss {metrics['val_loss_before']:.4f} -> {metrics['val_loss']:.4f}, "
        f"{metrics['tokens_per_s']:.0f} tokens/s")
    if as_json:
        click.echo(json.dumps({"adapter": str(out), **summary}))


# -- adapters ---------------------------------------------------------------------------------

@cli.group()
def adapter():
    """Inspect and pack adapters."""


@adapter.command("inspect")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@json_option
def adapter_inspect(adapter_dir, as_json):
    """Rank, targets, parameter count, size and the singular-value energy of each ΔW."""
    from .adapter import load_adapter
    from .adapter_stats import inspect_adapter

    info = inspect_adapter(load_adapter(adapter_dir), adapter_dir)
    if as_json:
        click.echo(json.dumps(info))
        return
    per_module = info.pop("per_module")
    print_fields(info)
    click.echo(f"\n{'module':<44} {'rank':>4} {'|dW|':>9} {'eff.rank@90%':>12}")
    for name, m in per_module.items():
        click.echo(f"{name:<44} {m['rank']:>4} {m['delta_norm']:>9.4f} {m['effective_rank_90']:>12}")


@adapter.command("pack")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@export_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The packed blob to write.")
@click.option("--force", is_flag=True, help="Replace the packed adapter at --out (blob and sidecar, together).")
@json_option
def adapter_pack(adapter_dir, export_dir, out, force, as_json):
    """Turn a PEFT-format adapter into the export target's native blob (checked against its base)."""
    from .exporters.export import pack

    info = pack(adapter_dir, export_dir, out, force=force)
    click.echo(json.dumps(info)) if as_json else print_fields(info)


@cli.command()
@base_option
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="DIR[:WEIGHT]", type=WeightedPath(),
              help="Adapter to merge, optionally with a strength; repeat to merge a blend.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged Hugging Face model directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def merge(base, adapters, out, force):
    """Write BASE with the adapters merged into its weights (W + ΔW), as a Hugging Face checkpoint."""
    from .base import load_base, resolve
    from .merge import merge_to_dir
    from .outputs import MODEL, check_output

    check_output(out, MODEL, force, {"--base": [resolve(base)], "--adapter": [Path(path) for path, _ in adapters]})
    loaded = load_base(base)
    merge_to_dir(loaded, load_weighted_adapters(adapters, loaded.fingerprint), out,
                 tuple(f"{path}:{weight:g}" for path, weight in adapters))
    click.echo(str(out))


# -- export -----------------------------------------------------------------------------------

@cli.command("export")
@base_option
@click.option("--target", required=True, type=click.Choice(list(TARGETS)))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export directory to write.")
@click.option("--quant", default=None, help="Weight quantisation of the base: " + "; ".join(
    f"{t.name}: {'|'.join(t.quants)}" for t in TARGETS.values()) + " (default: the first).")
@click.option("--max-rank", default=None, type=Bounded(bounds.RANK),
              help=f"Largest adapter rank the slots accept.  [default: {DEFAULT_MAX_RANK}]")
@click.option("--targets", default="all-linear", show_default=True, help="Which linears get adapter slots.")
@click.option("--max-seq-len", default=None, type=Bounded(bounds.EXPORT_SEQ_LEN),
              help=f"KV-cache length (at most the base's context).  [default: {DEFAULT_MAX_SEQ_LEN}]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--trainable", is_flag=True, help="executorch: export a LoRA training program instead "
              "(for `personalize --engine executorch --program`), shaped by --rank/--alpha/--targets/--batch-size/--seq-len.")
@click.option("--rank", default=8, show_default=True, type=Bounded(bounds.RANK), help="--trainable: LoRA rank.")
@click.option("--alpha", default=None, type=Bounded(bounds.ALPHA), help="--trainable: LoRA alpha.  [default: 2 x rank]")
@click.option("--batch-size", default=8, show_default=True, type=Bounded(bounds.POSITIVE_INT),
              help="--trainable: rows per step.")
@click.option("--seq-len", default=128, show_default=True, type=Bounded(bounds.SEQ_LEN),
              help="--trainable: tokens per row.")
@json_option
def export_cmd(base, target, out, quant, max_rank, targets, max_seq_len, force, trainable, rank, alpha, batch_size,
               seq_len, as_json):
    """Export the base once for a device runtime, with adapter slots and a KV cache."""
    from .exporters.export import export, export_trainable
    from .lora import LoraConfig, parse_targets

    if trainable:
        from .base import load_base

        if target != "executorch" or quant not in (None, "none", "int8"):
            raise OdloraError("--trainable exports an ExecuTorch program: use --target executorch "
                              "[--quant none|int8] (the frozen base's weights)")
        from .capacity import check_seq_len

        lora = LoraConfig(rank=rank, alpha=alpha, targets=parse_targets(targets))
        loaded = load_base(base)
        check_seq_len(seq_len, loaded.config)
        manifest = export_trainable(loaded, out, lora, batch_size, seq_len, force,
                                    say=lambda msg: click.echo(msg, err=True), base_quant=quant or "none")
    else:
        manifest = export(base, target, out, quant, max_rank, parse_targets(targets), max_seq_len, force,
                          say=lambda msg: click.echo(msg, err=True))
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    summary = {"export": str(out), "target": manifest["target"], "quant": manifest["quant"],
               **({"rank": rank} if trainable else {"max_rank": manifest["slots"]["max_rank"]}),
               "base_fingerprint": manifest["base_fingerprint"], "bytes": sum(sizes.values()), "export_seconds": manifest["export_seconds"]}
    click.echo(json.dumps({**summary, "files": sizes}) if as_json else print_fields(summary))


# -- the whole job ----------------------------------------------------------------------------

@cli.command()
@click.option("--base", "base", default=None, help=BASE_HELP)
@click.option("--out", default=Path("odlora-demo"), show_default=True, type=click.Path(path_type=Path),
              help="Working directory: adapters, exports, packed blobs and demo-state.json.")
@click.option("--targets", default=None, metavar="LIST",
              help="Runtimes to export for, in order: onnx,executorch (default: both; --quick: onnx).")
@click.option("--steps", default=None, type=Bounded(bounds.POSITIVE_INT),
              help="Training steps per adapter (default: 40; --quick: 20).")
@click.option("--examples", default=None, type=Bounded(bounds.POSITIVE_INT),
              help="Held-out test examples per task for exact match (default: 40; --quick: 20).")
@click.option("--quant", "quants", default=None, metavar="T=Q,...",
              help="Base quantisation per runtime (default: onnx=int4,executorch=fp32, the fastest to export).")
@click.option("--threads", default=None, type=Bounded(bounds.THREADS), help="CPU threads (default: all cores).")
@click.option("--quick", is_flag=True, help="Half the steps and test examples, ONNX only: a first look in minutes.")
@click.option("--fresh", is_flag=True, help="Redo every stage instead of reusing valid outputs in --out.")
@json_option
def demo(base, out, targets, steps, examples, quants, threads, quick, fresh, as_json):
    """The main job end to end on the shipped sample data (`dates`, `contacts`).

    \b
    Personalises two adapters on the default base, exports the base once per runtime (ONNX
    Runtime int4, ExecuTorch), packs both adapters for each export, then on one loaded base per
    runtime: held-out exact match (adapter vs base), requests that alternate the adapters, and
    the swap latency. Prints a summary table: exact match, sizes, swap latency, time per stage.
    A rerun reuses every stage whose output in --out is still valid.
    """
    from .demo import DemoConfig, format_summary, quick as quick_config, run_demo

    cfg = DemoConfig(base=base, out=out, threads=threads, fresh=fresh)
    if quick:
        cfg = quick_config(cfg)
    if targets is not None:
        cfg.targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if steps is not None:
        cfg.steps = steps
    if examples is not None:
        cfg.eval_examples = examples
    for spec in (quants or "").split(","):
        target, sep, quant = spec.strip().partition("=")
        if spec.strip() and not (sep and target and quant):
            raise OdloraError(f"--quant {quants!r}: write TARGET=QUANT, e.g. executorch=8da4w")
        if sep:
            cfg.quant[target] = quant
    summary = run_demo(cfg, say=lambda msg: click.echo(msg, err=True), show=click.echo)
    click.echo(format_summary(summary))
    if as_json:
        click.echo(json.dumps(summary))


# -- runtime ----------------------------------------------------------------------------------

@cli.command("run")
@export_option
@click.option("--adapter", "adapters", multiple=True, metavar="FILE[:WEIGHT]", type=WeightedPath(),
              help="Packed adapter blob (`odlora adapter pack`), optionally with a weight; repeat to blend several.")
@click.option("--prompt", required=True, type=Utf8Text(), help="The user's text.")
@backend_option
@sampling_options
@chat_option
@json_option
def run_cmd(export_dir, adapters, prompt, backend, chat, as_json, sampling):
    """Run one request on an exported base with packed adapters; prints the completion, streamed."""
    rt = open_runtime(export_dir, backend)
    ids = register_blobs(rt, [path for path, _ in adapters])
    blend = [(name, weight) for name, (_, weight) in zip(ids, adapters)] or None
    use_chat = asks_chat(rt.prompt_format(blend), chat, " + ".join(ids) or "base")
    result = rt.generate(prompt, adapter=blend, sampling=sampling, on_text=write_stdout, chat=use_chat)
    sys.stdout.write("\n")
    if as_json:
        click.echo(json.dumps({"text": result.text, "adapter": result.adapter, "tokens": len(result.token_ids),
                               "seconds": round(result.seconds, 4)}))


@cli.command()
@export_option
@named_adapters_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the loopback default keeps the server to this machine. Listening "
                   "elsewhere, set --api-key.")
@click.option("--port", default=8000, show_default=True, type=Bounded(bounds.PORT),
              help="TCP port (0: any free port).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header names NAME (any port), e.g. this machine's name on the "
                   "network; repeatable. Loopback names and the --host address are always answered.")
@click.option("--api-key", envvar="ODLORA_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every route (default: env ODLORA_API_KEY, which, unlike "
                   "the flag, other users' `ps` cannot see; none: no key). The web page: open /?key=KEY once.")
@click.option("--work", "work_dir", default=Path("odlora-web"), show_default=True, type=click.Path(path_type=Path),
              help="Where the web demo's personalisation jobs write adapters, packed blobs and uploads.")
@backend_option
def serve(export_dir, adapters, host, port, allow_hosts, api_key, work_dir, backend):
    """Serve an export over HTTP with OpenAI's API, each request choosing its adapter, and a web demo.

    \b
    GET  /v1/models              base and each --adapter id
    POST /v1/chat/completions    {"model", "messages", ...}, asked as each adapter was trained (chat template or raw)
    POST /v1/completions         {"model", "prompt", ...}, raw text
    GET  /                       the web demo: chat with several models side by side, personalise

    A request's `model` is `base`, an adapter id or a blend `a:0.7+b:0.3`; it honours max_tokens,
    temperature, top_p, seed, stop and stream (server-sent events). Absent fields take odlora's
    defaults (greedy, 128 tokens). Requests from another Host or Origin are refused (403). The page's
    personalisation jobs train on files of this machine, write under --work, and add each new
    adapter to the served models. Stop with Ctrl-C.
    """
    from .runtime.access import Access
    from .runtime.server import build_server, model_ids
    from .web.app import WebApp

    access = Access.build(host, allow_hosts, api_key)  # a bad flag fails before the export loads
    rt = open_runtime(export_dir, backend)
    register_blobs(rt, adapters)
    server = build_server(rt, host, port, webapp=WebApp(rt, work_dir), access=access, access_log=True)
    click.echo(f"odlora serve: listening on {server.url} (models: {', '.join(model_ids(rt))})")
    click.echo(f"odlora serve: web demo on {server.root}/")
    if api_key is not None:
        click.echo(f"odlora serve: every route needs the API key (Authorization: Bearer KEY); open "
                   f"{server.root}/?key=KEY once to use the page")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("odlora serve: stopped", err=True)
    finally:
        server.server_close()


@cli.command("chat")
@export_option
@named_adapters_option
@backend_option
@sampling_options
def chat_cmd(export_dir, adapters, backend, sampling):
    """Chat with an export in the terminal: answers streamed, the conversation kept, adapters swapped.

    \b
    Answers with the first --adapter (none: the base). Type a message, or:
      /adapter ID   answer with ID from now on (`base`: no adapter; a blend: a:0.7+b:0.3)
      /adapters     list the adapters
      /reset        forget the conversation
      /quit         leave (so does end of input)
    When the conversation outgrows the export's --max-seq-len, its oldest turns are dropped.
    """
    from .runtime.chat import run_chat

    rt = open_runtime(export_dir, backend)
    ids = register_blobs(rt, adapters)
    run_chat(rt, sys.stdin.buffer, sys.stdout, sampling, ids[0] if ids else "base")  # bytes: run_chat decodes


@cli.command("bundle")
@export_option
@named_adapters_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The bundle directory to write.")
@click.option("--no-base", is_flag=True, help="Bundle the adapters alone, to be downloaded later onto an installed base bundle.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the new bundle is complete).")
@json_option
def bundle_cmd(export_dir, adapters, out, no_base, force, as_json):
    """Write what an app ships: the exported base, tokenizer, prompt format and packed adapters,
    with a manifest (format version, base fingerprint, slot spec, sha256 and size of every file).

    \b
    --adapter [ID=]FILE   a packed blob for this export (id: the file's stem); repeatable
    --no-base             an adapter bundle, checked against the app's base bundle when opened
    Open one with `odlora run/serve/chat --export BUNDLE`, or check it with `odlora verify`.
    """
    from .runtime.bundle import write_bundle

    pairs = [split_id(spec) for spec in adapters]
    named = [(name or Path(path).name.split(".")[0], Path(path)) for name, path in pairs]
    for name, _ in named:
        check_id(name)  # a bundled adapter is asked for by its id, as in `serve`
    manifest = write_bundle(export_dir, named, out, with_base=not no_base, force=force)
    size = sum(f["size"] for f in manifest["files"].values())
    summary = {"bundle": str(out), "kind": manifest["kind"], "target": manifest["target"],
               "adapters": [a["id"] for a in manifest["adapters"]], "files": len(manifest["files"]), "bytes": size}
    click.echo(f"wrote {manifest['kind']} bundle {out}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB, "
               f"adapters: {', '.join(summary['adapters']) or 'none'}")
    if as_json:
        click.echo(json.dumps(summary))


@cli.command("verify")
@click.argument("bundle_dir", metavar="BUNDLE", type=EXISTING_DIR)
@click.option("--base", "base_bundle", default=None, type=EXISTING_DIR,
              help="The installed base bundle an adapter bundle must match.")
@json_option
def verify_cmd(bundle_dir, base_bundle, as_json):
    """Check a bundle: format version, paths, every file's sha256, and the base it was made for."""
    from .runtime.bundle import open_bundle

    base = open_bundle(base_bundle) if base_bundle else None
    bundle = open_bundle(bundle_dir, base=base)
    m = bundle.manifest
    click.echo(f"{bundle_dir}: ok ({m['kind']} bundle, {m['target']}, {len(m['files'])} files verified, "
               f"adapters: {', '.join(a['id'] for a in m['adapters']) or 'none'})")
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle_dir), "ok": True, "kind": m["kind"], "target": m["target"],
                               "adapters": [a["id"] for a in m["adapters"]]}))


def main():
    try:
        cli.main(standalone_mode=False)
    except OdloraError as e:
        click.echo(f"odlora: error: {e.for_cli()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("odlora: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"odlora: error: {click_error_line(e)}", err=True)
        sys.exit(2)
