"""Benchmark runner: `python benchmarks/run.py [--family parammap] [--quick]` (or `gradkit bench`).

Runs each family side by side with the reference and the peers, prints a ratio
table, and writes <out>/<family>-<device>-<threads>t.{jsonl,md,png}.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import Recorder, plot, ratio_table  # noqa: E402

FAMILIES = ["parammap", "select", "scope", "golden", "adamw", "obs", "projection", "index"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="default: all families")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the issues measure with 2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="short timings, skip the slowest peer runs")
    args = ap.parse_args(argv)
    try:  # before any benchmark runs: a file there (or no permission) would otherwise lose every result at the end
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"--out: cannot use {args.out!r} as the results directory ({e.strerror or e})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for fam in args.family or FAMILIES:
        print(f"== {fam} on {args.device} ({torch.get_num_threads()} threads)", flush=True)
        rec = Recorder(args.device, min_run_time=0.3 if args.quick else 1.0)
        importlib.import_module(f"bench_{fam}").run(rec, quick=args.quick)
        stem = os.path.join(args.out, f"{fam}-{args.device}-{torch.get_num_threads()}t")
        rec.write_jsonl(stem + ".jsonl")
        table = ratio_table(rec.rows)
        with open(stem + ".md", "w") as f:
            f.write(f"# {fam} benchmark\n\n`python benchmarks/run.py --family {fam}`\n\n" + table)
        plot(rec.rows, stem + ".png")
        print("\n" + table)
        print(f"wrote {stem}.jsonl, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
