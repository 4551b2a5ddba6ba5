"""The whole job through the Python API: personalise an adapter on a shipped sample, export the
base once to ONNX, pack the adapter for it, and ask the base and the adapter the same questions.

    python examples/python_api.py                          # the default base (`odlora base pull` first): ~3 min
    python examples/python_api.py --base DIR_OR_HUB_ID --steps 20 --out /tmp/odlora-example [--max-seq-len 256]

Writes under --out (default ./odlora-example): adapters/dates, exports/onnx, dates.onnx_adapter;
run it again with --force to replace them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ondevice_lora import PersonalizeConfig, Runtime, SamplingConfig, TrainConfig, export, pack, personalize
from ondevice_lora.samples import load_examples


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="a base (default: the default base)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: scaled to the data)")
    parser.add_argument("--out", type=Path, default=Path("odlora-example"))
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=256, help="the export's KV-cache length")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    adapter_dir, export_dir, blob = args.out / "adapters" / "dates", args.out / "exports" / "onnx", args.out / "dates.onnx_adapter"
    config = PersonalizeConfig(base=args.base, training=TrainConfig(steps=args.steps))
    metrics = personalize(config, "dates", adapter_dir, force=args.force, say=lambda *_: None)
    print(f"trained {adapter_dir}: validation loss {metrics['val_loss_before']:.2f} -> {metrics['val_loss']:.2f}")
    export(args.base, "onnx", export_dir, max_seq_len=args.max_seq_len, force=args.force, say=lambda *_: None)
    pack(adapter_dir, export_dir, blob, force=args.force)

    rt = Runtime.open(export_dir)
    rt.register_adapter("dates", blob)
    answers = {}
    for example in load_examples("dates", "test")[: args.questions]:
        question = example["messages"][:1]
        answers[question[0]["content"]] = {model: rt.generate(question, adapter=model, sampling=SamplingConfig(
            max_new_tokens=24)).text for model in (None, "dates")}
        print(f"Q: {question[0]['content']}\n  base:  {answers[question[0]['content']][None]!r}\n"
              f"  dates: {answers[question[0]['content']]['dates']!r}")
    return answers


if __name__ == "__main__":
    main()
