"""PNG plots of a training run's metrics.jsonl, one file per quantity, to look at a GAN run rather than read it:

  losses.png      loss, D loss (adversarial + lambda aR1), D's adversarial part, G loss
  logit_gap.png   D(real) and D(fake) logits and their gap (a gap that runs away marks a collapsing D)
  ar1.png         the approximated R1 penalty (paper Fig. 5: without it D collapses)
  grad_norm.png   gradient norms of the model, or of G and D
  throughput.png  samples/s and model TFLOP/s per GPU
  memory.png      peak memory per rank

    plot_run("runs/apt_image")                     # -> runs/apt_image/plots/*.png
    plot_run("runs/x/metrics.jsonl", out="figs")   # any metrics.jsonl
    plot_compare({"aR1": "runs/apt_image", "no aR1": "runs/apt_image_no_r1"}, "figs/ablation.png")

A quantity the run did not log (a flow-matching run has no logits) gets no file. Steps logged twice (a run
resumed from an earlier checkpoint) keep their last record; non-finite values (a NaN step) are left out of
the line and marked on the axis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

# file stem, title, y label, [(metrics key, legend)], log scale
PANELS: list[tuple[str, str, str, list[tuple[str, str]], bool]] = [
    ("losses", "Losses", "loss", [("loss", "loss"), ("d_loss", "D loss (adversarial + lambda aR1)"),
                                  ("d_adv", "D adversarial"), ("g_loss", "G loss")], False),
    ("logit_gap", "Discriminator logits", "logit", [("logit_real", "D(real)"), ("logit_fake", "D(fake)"),
                                                    ("logit_gap", "gap D(real) - D(fake)")], False),
    ("ar1", "Approximated R1", "aR1", [("ar1", "aR1")], True),
    ("grad_norm", "Gradient norms", "L2 norm", [("grad_norm", "model"), ("g_grad_norm", "G"),
                                                ("d_grad_norm", "D")], True),
    ("throughput", "Throughput", "samples/s", [("samples_per_s", "samples/s")], False),
    ("memory", "Peak memory per rank", "GiB", [("peak_mem_gb", "peak memory")], False),
]


def metrics_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "metrics.jsonl" if p.is_dir() else p


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl by step (the last one wins for a step logged twice). Lines that do not
    parse (cut by a crash) are skipped; NaN and null both read as NaN."""
    f = metrics_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist (give a run folder or a metrics.jsonl)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` where it was logged (None / null as NaN)."""
    xs, ys = [], []
    for r in records:
        if key in r and (r[key] is None or isinstance(r[key], (int, float))) and not isinstance(r[key], bool):
            xs.append(int(r["step"]))
            ys.append(float("nan") if r[key] is None else float(r[key]))
    return xs, ys


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_records(records: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write one PNG per panel that has data; returns the files written."""
    plt = _plt()
    out = Path(out_dir)
    written = []
    for stem, name, ylabel, keys, log in PANELS:
        lines = [(label, *series(records, k)) for k, label in keys]
        lines = [(lab, x, y) for lab, x, y in lines if any(math.isfinite(v) for v in y)]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        bad: set[int] = set()
        for label, x, y in lines:
            ok = [(a, b) for a, b in zip(x, y) if math.isfinite(b) and (not log or b > 0)]
            bad |= {a for a, b in zip(x, y) if not math.isfinite(b)}
            ax.plot([a for a, _ in ok], [b for _, b in ok], label=label, lw=1.4, marker="." if len(ok) < 40 else None)
        if stem == "throughput":
            x, y = series(records, "tflops")
            ok = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
            if ok:
                ax2 = ax.twinx()
                ax2.plot([a for a, _ in ok], [b for _, b in ok], color="tab:orange", lw=1.0, ls="--",
                         label="TFLOP/s per GPU")
                ax2.set_ylabel("model TFLOP/s per GPU")
                ax2.legend(loc="lower right", fontsize=8)
        if bad:
            for a in sorted(bad):
                ax.axvline(a, color="red", alpha=0.25, lw=1)
            ax.plot([], [], color="red", alpha=0.5, label=f"non-finite ({len(bad)} step(s))")
        if log and all(b > 0 for _, _, y in lines for b in y if math.isfinite(b)):
            ax.set_yscale("log")
        if stem == "logit_gap":
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}" if title else name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_run(run: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plots of a run folder's (or a metrics.jsonl's) metrics into `out` (default: RUN/plots)."""
    f = metrics_file(run)
    records = read_records(f)
    if out is None:
        out = f.parent / "plots"
    return plot_records(records, out, title=f.parent.name)


# the quantities a comparison of APT runs (an ablation) puts side by side: one panel each, one line per run
COMPARE_KEYS: list[tuple[str, str]] = [("d_loss", "D loss"), ("g_loss", "G loss"),
                                       ("logit_gap", "D(real) - D(fake)"), ("ar1", "approximated R1")]


def plot_compare(runs: dict[str, str | Path], out: str | Path, keys: Sequence[tuple[str, str]] = COMPARE_KEYS,
                 title: str = "") -> Path:
    """One PNG with a panel per quantity in `keys` that any run logged and a line per run (label -> run folder
    or metrics.jsonl): e.g. the D loss and logit gap of an APT run against its no-aR1 ablation."""
    plt = _plt()
    data = {label: read_records(run) for label, run in runs.items()}
    panels = [(k, name) for k, name in keys
              if any(any(math.isfinite(v) for v in series(recs, k)[1]) for recs in data.values())]
    if not panels:
        raise ValueError(f"none of the runs logged any of {', '.join(k for k, _ in keys)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for label, recs in data.items():
            x, y = series(recs, key)
            ok = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
            if ok:
                ax.plot([a for a, _ in ok], [b for _, b in ok], label=label, lw=1.4,
                        marker="." if len(ok) < 40 else None)
        if key == "logit_gap":
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
