"""response_format's JSON schema on the contacts sample's test split: how many answers are valid
JSON matching the schema, with and without the grammar, and what the grammar costs per token.

    python bench/bench_json_schema.py --export odlora-demo/exports/onnx                    # the base
    python bench/bench_json_schema.py --export odlora-demo/exports/onnx \\
        --adapter contacts=odlora-demo/packed/onnx/contacts.onnx_adapter                  # the demo's adapter
    ... [--limit 100] [--max-tokens 64] [--json]

Each question is asked greedily through `Runtime.generate`, once free and once constrained
(`SamplingConfig.grammar`), taking turns, on 2 threads. Prints the valid share of each, exact
match against the split's answers, and the median decode time per token of each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

from ondevice_lora.config import SamplingConfig
from ondevice_lora.grammar import json_grammar
from ondevice_lora.runtime import Runtime
from ondevice_lora.samples import load_examples

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
          "required": ["name", "city"], "additionalProperties": False}


def matches(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "city"} and all(isinstance(v, str) for v in value.values())


def run(args) -> dict:
    rt = Runtime.open(args.export, threads=2)
    adapter = None
    if args.adapter:
        adapter, _, blob = args.adapter.partition("=")
        rt.register_adapter(adapter, blob)
    examples = load_examples("contacts", "test")[: args.limit]
    grammar = json_grammar(SCHEMA)
    rows = {"free": [], "schema": []}
    for example in examples:
        question, answer = example["messages"][:1], example["messages"][1]["content"]
        for kind in rows:
            cfg = SamplingConfig(max_new_tokens=args.max_tokens, grammar=grammar if kind == "schema" else None)
            result = rt.generate(question, adapter=adapter, sampling=cfg)
            decode = (result.seconds - result.prefill_seconds) / max(1, len(result.token_ids))
            rows[kind].append((matches(result.text), json_equal(result.text, answer), decode))
    summary = {kind: {"valid": sum(r[0] for r in got) / len(got), "exact": sum(r[1] for r in got) / len(got),
                      "ms_per_token": round(1000 * statistics.median(r[2] for r in got), 2)}
               for kind, got in rows.items()}
    return {"command": shlex.join([sys.executable, *sys.argv]), "questions": len(examples),
            "model": adapter or "base", **summary}


def json_equal(text: str, answer: str) -> bool:
    try:
        return json.loads(text) == json.loads(answer)
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--adapter", help="ID=BLOB: ask this packed adapter instead of the base")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(result["command"])
    print(f"{result['questions']} questions of the contacts test split, model {result['model']}")
    for kind in ("free", "schema"):
        r = result[kind]
        print(f"  {kind:6}  valid {r['valid']:.0%}  exact {r['exact']:.0%}  {r['ms_per_token']} ms/token (median)")


if __name__ == "__main__":
    main()
