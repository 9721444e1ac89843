"""PNG plots of training runs: losses, the D(real)/D(fake) logit gap, aR1, gradient norms, throughput and
memory over steps, read from each run's metrics.jsonl.

    python tools/plot_run.py runs/apt_image                       # -> runs/apt_image/plots/*.png
    python tools/plot_run.py runs/cd runs/apt_image runs/apt_video   # several runs, each into its own plots/
    python tools/plot_run.py examples/toy/pretrain_metrics.jsonl --out figs/toy_pretrain
    python tools/plot_run.py --compare figs/ablation.png aR1=runs/apt_image "no aR1=runs/apt_image_no_r1"

The trainer writes the same plots at the end of every run (plots: true), and the quickstart report embeds
them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run folder (or a metrics.jsonl file)")
    p.add_argument("--out", help="output folder (one run only; default RUN_DIR/plots)")
    p.add_argument("--compare", metavar="OUT_PNG",
                   help="instead: one figure comparing the runs (given as LABEL=RUN_DIR) on D loss, G loss, "
                        "logit gap and aR1")
    a = p.parse_args(argv)
    from megatron_apt.metrics.plots import plot_compare, plot_run

    if a.compare:
        if a.out:
            print("error: --compare writes the one file it names; drop --out", file=sys.stderr)
            return 2
        runs = {}
        for r in a.runs:
            label, sep, path = r.partition("=")
            if not sep or not label or not path:
                print(f"error: --compare takes runs as LABEL=RUN_DIR, got {r!r}", file=sys.stderr)
                return 2
            runs[label] = path
        try:
            print(plot_compare(runs, a.compare))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    if a.out and len(a.runs) > 1:
        print("error: --out takes one run; without it each run gets RUN_DIR/plots", file=sys.stderr)
        return 2
    for run in a.runs:
        try:
            written = plot_run(run, a.out)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not written:
            print(f"error: {run}: metrics.jsonl holds no finite value to plot", file=sys.stderr)
            return 2
        print(f"{run}: {len(written)} plot(s) in {Path(written[0]).parent}: "
              + ", ".join(Path(w).name for w in written))
    return 0
