"""How long loading a base takes, in a fresh process each time (imports included).

    python bench/bench_load.py                  # the default base, 3 fresh processes
    python bench/bench_load.py --base DIR --runs 5

The first load after `odlora base pull` also hashes the weights once for the fingerprint
cache; later loads read the cached fingerprint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from ondevice_lora.base import load_base
base = load_base({base!r})
t2 = time.perf_counter()
print(json.dumps({{"import_torch_s": t1 - t0, "load_base_s": t2 - t1, "total_s": t2 - t0}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    for run in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD.format(base=args.base)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"run {run + 1}: import torch {r['import_torch_s']:.2f} s, load_base {r['load_base_s']:.2f} s, "
              f"total {r['total_s']:.2f} s")


if __name__ == "__main__":
    main()
