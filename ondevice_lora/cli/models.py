"""The commands that make things from a base: inspect and pull it, generate, personalise an
adapter, inspect, pack and merge adapters, export the base, and the whole job (`demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import bounds
from ..cli_types import EXISTING_DIR, Bounded, Utf8Text, WeightedPath
from ..config import (BASE_QUANTS, COMPUTE_DTYPES, DEFAULT_BASE_QUANT, DEFAULT_EPOCHS, DEFAULT_TARGETS, ENGINES,
                      MAX_DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, LoraConfig, PersonalizeConfig, TrainConfig, parse_targets)
from ..demo import DemoConfig, quick as quick_config, table
from ..errors import OdloraError
from ..exporters.executorch_delegates import DELEGATES as EXECUTORCH_DELEGATES
from ..formats.slots import DEFAULT_MAX_RANK
from ..formats.targets import DEFAULT_MAX_SEQ_LEN, TARGETS
from ..prompts import PROMPT_FORMATS
from ..registry import DEFAULT_BASE
from .app import cli
from .options import (BASE_HELP, asks_chat, base_option, chat_option, config_file_option, export_option, given,
                      json_option, load_weighted_adapters, print_fields, sampling_options, setting, write_stdout)


# -- bases ------------------------------------------------------------------------------------

@cli.group()
def base():
    """Fetch and inspect base models."""


@base.command("pull")
@click.argument("name", default=DEFAULT_BASE)
def base_pull(name):
    """Download a base (the only command that uses the network): a registered NAME (see `base list`)
    is fetched, checked and converted; a Hugging Face model id (OWNER/NAME) is fetched into the hub's
    own cache, only its config, safetensors weights and tokenizer.

    Prints the local directory of the base.
    """
    from .. import hub, registry

    if name not in registry.REGISTRY and hub.is_hub_id(name):
        click.echo(f"downloading {name} from the Hugging Face hub ...", err=True)
        click.echo(str(hub.download(name)))
        return
    click.echo(str(registry.pull(name, progress=lambda msg: click.echo(msg, err=True))))


@base.command("list")
@json_option
def base_list(as_json):
    """The registered bases (pulled or not) and the models in the Hugging Face cache, each with
    whether odlora can load it (its architecture)."""
    from .. import hub, registry
    from ..hf_checkpoint import read_config
    from ..models import FAMILIES

    rows = [{"base": name, "kind": "registered", "pulled": registry.is_pulled(name), "hub_id": entry.hub_id,
             "about": entry.description} for name, entry in registry.REGISTRY.items()]
    for model in hub.cached_models():
        try:
            model_type = read_config(Path(model["path"])).get("model_type")
            about = f"{model_type}, {model['bytes'] / 1e6:.0f} MB"
            about += "" if model_type in FAMILIES else " (an architecture odlora does not load)"
        except OdloraError as e:
            about = f"unreadable: {e}"
        rows.append({"base": model["id"], "kind": "hugging face cache", "pulled": True, "hub_id": model["id"],
                     "about": about})
    if as_json:
        click.echo(json.dumps(rows))
        return
    cells = [["base", "kind", "pulled", "about"]] + [[r["base"], r["kind"], "yes" if r["pulled"] else "no", r["about"]]
                                                    for r in rows]
    click.echo("\n".join(table(cells, left=4)))


@base.command("info")
@click.argument("base_spec", metavar="BASE", default=DEFAULT_BASE)
@json_option
def base_info(base_spec, as_json):
    """Architecture, parameter count, dtype, fingerprint and size of BASE."""
    from ..base import describe_base, load_base

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
    from ..adapter import attach_adapter
    from ..base import load_base
    from ..generate import generate_text
    from ..prompts import DEFAULT_PROMPT_FORMAT, encode_prompt, stop_token_ids

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
@config_file_option
@base_option
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help=".txt; rows of {text} | {prompt, completion} | {messages} | alpaca's {instruction, input, output} | "
                   "sharegpt's {conversations} as .jsonl, .json, .csv or .parquet; a directory of them; or a "
                   "shipped sample by name (dates, contacts; dates:test for its test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write (PEFT format).")
@setting("--rank", LoraConfig, type=Bounded(bounds.RANK))
@click.option("--alpha", default=None, type=Bounded(bounds.ALPHA),
              help="LoRA scale numerator (scale alpha/rank).  [default: 2 x rank]")
@setting("--dropout", LoraConfig, type=Bounded(bounds.DROPOUT))
@click.option("--rslora", "use_rslora", is_flag=True, help="Scale by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--targets", default=DEFAULT_TARGETS, show_default=True,
              help="qv | attn | all-linear | comma-separated module names (q_proj,v_proj,...).")
@setting("--layers", PersonalizeConfig, help="all | middle | A-B | i,j,k")
@click.option("--base-quant", default=None, type=click.Choice(BASE_QUANTS),
              help="How the frozen base is held while training.  [default: " +
                   "; ".join(f"{quant} with --engine {engine}" for engine, quant in DEFAULT_BASE_QUANT.items()) + "]")
@setting("--dtype", PersonalizeConfig, type=click.Choice(COMPUTE_DTYPES),
         help="Compute dtype; auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX, ARM64), "
              "else fp32, which is much faster there; fp32 with --engine executorch.")
@setting("--engine", PersonalizeConfig, type=click.Choice(ENGINES),
         help="torch: PyTorch autograd (laptop); executorch: an exported ExecuTorch training program (device).")
@click.option("--program", default=None, type=EXISTING_DIR,
              help="--engine executorch: a program from `odlora export --trainable` (default: exported once, cached).")
@setting("--format", PersonalizeConfig, "prompt_format", type=click.Choice(PROMPT_FORMATS),
         help="How prompt/completion rows are rendered: chat (one user turn and the answer, through the "
              "base's chat template, as run/serve/chat ask by default) or raw (prompt + completion "
              "concatenated). Recorded in the adapter; the runtimes ask it the same way.")
@click.option("--steps", default=None, type=Bounded(bounds.POSITIVE_INT), help="Optimiser steps (overrides --epochs).")
@click.option("--epochs", default=None, type=Bounded(bounds.EPOCHS),
              help=f"Passes over the data (default: {DEFAULT_EPOCHS:g}, but at least {MIN_DEFAULT_STEPS} steps and "
                   f"at most {MAX_DEFAULT_EPOCHS} passes).")
@setting("--lr", TrainConfig, type=Bounded(bounds.LR))
@setting("--batch-size", TrainConfig, type=Bounded(bounds.POSITIVE_INT))
@setting("--grad-accum", TrainConfig, type=Bounded(bounds.POSITIVE_INT))
@setting("--seq-len", PersonalizeConfig, type=Bounded(bounds.SEQ_LEN), help="Tokens per packed row (at most the base's context).")
@setting("--val-split", PersonalizeConfig, type=Bounded(bounds.VAL_SPLIT))
@click.option("--val-data", default=None, type=click.Path(path_type=Path), help="Held-out data instead of a split.")
@click.option("--train-on-prompt", is_flag=True, help="Also train on prompt / user tokens.")
@setting("--seed", TrainConfig, type=Bounded(bounds.SEED))
@setting("--eval-every", TrainConfig, type=Bounded(bounds.NON_NEGATIVE_INT), help="Validate every N steps (0: start and end).")
@setting("--save-every", TrainConfig, type=Bounded(bounds.NON_NEGATIVE_INT), help="Checkpoint every N steps (0: never).")
@setting("--early-stopping", TrainConfig, type=Bounded(bounds.NON_NEGATIVE_INT),
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
def personalize(base, data, out, rank, alpha, dropout, use_rslora, targets, layers, base_quant, dtype, engine, program,
                prompt_format, steps, epochs, lr, batch_size, grad_accum, seq_len, val_split, val_data, train_on_prompt, seed,
                eval_every, save_every, early_stopping, activation_checkpointing, compile_layers, threads, resume, force,
                dry_run, as_json):
    """Train a LoRA adapter on local data against a frozen, quantised base."""
    from ..personalization import dry_run as personalize_dry_run, format_dry_run, personalize as run
    from ..progress import TrainingProgress

    lora = LoraConfig(**given(rank=rank, alpha=alpha, dropout=dropout), use_rslora=use_rslora,
                      targets=parse_targets(targets))
    training = TrainConfig(**given(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                                   seed=seed, eval_every=eval_every, save_every=save_every, early_stopping=early_stopping),
                           activation_checkpointing=activation_checkpointing, compile=compile_layers)
    cfg = PersonalizeConfig(**given(seq_len=seq_len, val_split=val_split, base_quant=base_quant, dtype=dtype, engine=engine,
                                    layers=layers, prompt_format=prompt_format),
                            base=base, lora=lora, training=training, val_data=val_data, program=program,
                            train_on_prompt=train_on_prompt, threads=threads)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if dry_run:
        info = personalize_dry_run(cfg, data)
        click.echo(json.dumps(info) if as_json else format_dry_run(info))
        return
    from ..exporters.export import cached_training_program

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
    """List, inspect, pack and remove adapters."""


@adapter.command("list")
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
@json_option
def adapter_list(folders, as_json):
    """The adapters under FOLDERS (default: the current folder), a few levels down: adapter
    directories and packed adapters, with their base, rank, training steps, validation loss and size."""
    from ..adapter_store import find_adapters

    found = find_adapters(folders or (Path("."),))
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no adapters found", err=True)
        return
    rows = [["path", "kind", "base", "rank", "steps", "val loss", "MB"]] + [
        [a["path"], a["kind"], a["base"] or (a["base_fingerprint"] or "?")[:12], str(a["rank"] or "?"),
         str(a["steps"] or "?"), f"{a['val_loss']:.3f}" if isinstance(a["val_loss"], (int, float)) else "?",
         f"{a['bytes'] / 1e6:.1f}"] for a in found]
    click.echo("\n".join(table(rows, left=3)))


@adapter.command("rm")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--yes", "-y", is_flag=True, help="Do not ask (needed when stdin is not a terminal).")
def adapter_rm(paths, yes):
    """Remove adapter directories or packed adapters (blob and sidecar). Anything else at a PATH
    is refused and left as it is; each removal is whole or not at all."""
    from ..adapter_store import remove_adapter, removable

    for path in paths:  # every path checked before any is removed
        removable(path)
    if not yes:
        if not sys.stdin.isatty():
            raise OdloraError("removing needs --yes when stdin is not a terminal")
        click.confirm(f"remove {', '.join(map(str, paths))}?", abort=True, err=True)
    for path in paths:
        click.echo(remove_adapter(path), err=True)


@adapter.command("inspect")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@json_option
def adapter_inspect(adapter_dir, as_json):
    """Rank, targets, parameter count, size and the singular-value energy of each ΔW."""
    from ..adapter import load_adapter
    from ..adapter_stats import inspect_adapter

    info = inspect_adapter(load_adapter(adapter_dir), adapter_dir)
    if as_json:
        click.echo(json.dumps(info))
        return
    per_module, metrics = info.pop("per_module"), info.pop("metrics")
    info["targets"] = ", ".join(info["targets"])
    print_fields(info)
    if metrics:
        click.echo("\ntraining")
        print_fields({key: f"{value:.4g}" if isinstance(value, float) else value for key, value in metrics.items()})
    rows = [["module", "rank", "|dW|", "eff. rank @90%"]] + [
        [name, str(m["rank"]), f"{m['delta_norm']:.4f}", str(m["effective_rank_90"])] for name, m in per_module.items()]
    click.echo("\n" + "\n".join(table(rows)))


@adapter.command("pack")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@export_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The packed blob to write.")
@click.option("--force", is_flag=True, help="Replace the packed adapter at --out (blob and sidecar, together).")
@json_option
def adapter_pack(adapter_dir, export_dir, out, force, as_json):
    """Turn a PEFT-format adapter into the export target's native blob (checked against its base)."""
    from ..exporters.export import pack

    info = pack(adapter_dir, export_dir, out, force=force)
    click.echo(json.dumps(info)) if as_json else print_fields(info)


@cli.command()
@base_option
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="DIR[:WEIGHT]", type=WeightedPath(),
              help="Adapter to merge, optionally with a strength; repeat to merge a blend.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged Hugging Face model directory.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="The weights' dtype on disk (the merge itself is computed in fp32).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def merge(base, adapters, out, dtype, force):
    """Write BASE with the adapters merged into its weights (W + ΔW), as a Hugging Face checkpoint
    with the base's tokenizer, chat template and generation_config.json."""
    from ..base import load_base, resolve
    from ..merge import merge_to_dir
    from ..outputs import MODEL, check_output

    check_output(out, MODEL, force, {"base": [resolve(base)], "adapter": [Path(path) for path, _ in adapters]})
    loaded = load_base(base)
    merge_to_dir(loaded, load_weighted_adapters(adapters, loaded.fingerprint), out,
                 tuple(f"{path}:{weight:g}" for path, weight in adapters), dtype)
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
@click.option("--targets", default=DEFAULT_TARGETS, show_default=True, help="Which linears get adapter slots.")
@click.option("--max-seq-len", default=None, type=Bounded(bounds.EXPORT_SEQ_LEN),
              help=f"KV-cache length (at most the base's context).  [default: {DEFAULT_MAX_SEQ_LEN}]")
@click.option("--backend", default=None, type=click.Choice(EXECUTORCH_DELEGATES),
              help="executorch: the delegate the program is lowered to: " + ", ".join(EXECUTORCH_DELEGATES)
              + " (ExecuTorch's partitioners; the slots stay runtime inputs on each).  [default: xnnpack]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--trainable", is_flag=True, help="executorch: export a LoRA training program instead "
              "(for `personalize --engine executorch --program`), shaped by --rank/--alpha/--targets/--batch-size/--seq-len.")
@setting("--rank", LoraConfig, type=Bounded(bounds.RANK), help="--trainable: LoRA rank.")
@click.option("--alpha", default=None, type=Bounded(bounds.ALPHA), help="--trainable: LoRA alpha.  [default: 2 x rank]")
@setting("--batch-size", TrainConfig, type=Bounded(bounds.POSITIVE_INT), help="--trainable: rows per step.")
@setting("--seq-len", PersonalizeConfig, type=Bounded(bounds.SEQ_LEN), help="--trainable: tokens per row.")
@json_option
def export_cmd(base, target, out, quant, max_rank, targets, max_seq_len, backend, force, trainable, rank, alpha,
               batch_size, seq_len, as_json):
    """Export the base once for a device runtime, with adapter slots and a KV cache."""
    from ..exporters.export import export

    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if trainable and backend:
        raise OdloraError("--trainable programs run on ExecuTorch's portable and XNNPACK kernels: drop --backend",
                          param="backend")
    if trainable:
        lora = LoraConfig(**given(rank=rank, alpha=alpha), targets=parse_targets(targets))
        shape = PersonalizeConfig(**given(seq_len=seq_len), training=TrainConfig(**given(batch_size=batch_size)))
        manifest = export_training_program(base, target, quant, lora, shape, out, force, say)
    else:
        manifest = export(base, target, out, quant, max_rank, parse_targets(targets), max_seq_len, force, say=say,
                          options={"backend": backend})
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    summary = {"export": str(out), "target": manifest["target"], "quant": manifest["quant"],
               **({"rank": lora.rank} if trainable else {"max_rank": manifest["slots"]["max_rank"]}),
               "base_fingerprint": manifest["base_fingerprint"], "bytes": sum(sizes.values()), "export_seconds": manifest["export_seconds"]}
    click.echo(json.dumps({**summary, "files": sizes}) if as_json else print_fields(summary))


def export_training_program(base: str, target: str, quant, lora: LoraConfig, shape: PersonalizeConfig, out: Path,
                            force: bool, say) -> dict:
    """`export --trainable`: an ExecuTorch training program for rows of shape.training.batch_size x shape.seq_len."""
    from ..base import load_base
    from ..capacity import check_seq_len
    from ..exporters.export import export_trainable

    if target != "executorch" or quant not in (None, "none", "int8"):
        raise OdloraError("--trainable exports an ExecuTorch program: use --target executorch "
                          "[--quant none|int8] (the frozen base's weights)")
    loaded = load_base(base)
    check_seq_len(shape.seq_len, loaded.config)
    return export_trainable(loaded, out, lora, shape.training.batch_size, shape.seq_len, force, say=say,
                            base_quant=quant or DEFAULT_BASE_QUANT["executorch"])


# -- the whole job ----------------------------------------------------------------------------

DEMO = DemoConfig()
QUICK_DEMO = quick_config(DEMO)

@cli.command()
@click.option("--base", "base", default=None, help=f"{BASE_HELP}  [default: {DEFAULT_BASE}]")
@click.option("--out", default=DEMO.out, show_default=True, type=click.Path(path_type=Path),
              help="Working directory: adapters, exports, packed blobs and demo-state.json.")
@click.option("--targets", default=None, metavar="LIST",
              help=f"Runtimes to export for, in order (default: {','.join(DEMO.targets)}; --quick: {','.join(QUICK_DEMO.targets)}).")
@click.option("--steps", default=None, type=Bounded(bounds.POSITIVE_INT),
              help=f"Training steps per adapter (default: {DEMO.steps}; --quick: {QUICK_DEMO.steps}).")
@click.option("--examples", default=None, type=Bounded(bounds.POSITIVE_INT),
              help=f"Held-out test examples per task for exact match (default: {DEMO.eval_examples}; "
                   f"--quick: {QUICK_DEMO.eval_examples}).")
@click.option("--quant", "quants", default=None, metavar="T=Q,...",
              help="Base quantisation per runtime (default: " + ",".join(f"{t}={q}" for t, q in DEMO.quant.items()) +
                   ", the fastest to export).")
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
    from .. import demo as job  # looked up when run, so that tests can give the demo a tiny model's config

    cfg = job.DemoConfig(base=base, out=out, threads=threads, fresh=fresh)
    if quick:
        cfg = job.quick(cfg)
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
    summary = job.run_demo(cfg, say=lambda msg: click.echo(msg, err=True), show=click.echo)
    click.echo(job.format_summary(summary))
    if as_json:
        click.echo(json.dumps(summary))
