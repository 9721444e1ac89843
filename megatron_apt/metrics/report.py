"""A Markdown evaluation report with PNG plots: ``write_report(out_dir, sections)`` -> ``out_dir/report.md``.

``sections`` is a list of dicts, rendered in order (build them with the helpers below):

* ``r1_ablation_section(with_r1, without_r1)``: the paper's Fig. 5 at toy scale, D's adversarial loss
  (``d_adv`` of two ``metrics.jsonl`` files) over steps with and without approximated R1;
* ``grids_section({name: png_path_or_video_tensor})``: sample grids of each compared model;
* ``metrics_section(metrics)``: the table of :mod:`megatron_apt.metrics.toy_eval` numbers (the dict that
  ``tools/evaluate.py`` writes per evaluation set), with a bar chart;
* ``training_section({name: run_dir})``: each run's curves over steps (``megatron_apt.metrics.plots``);
* ``markdown_section(title, text)``: free text.

A "Findings" paragraph at the top is *computed* from the numbers in those sections (comparisons are
called only when they exceed twice the combined bootstrap / standard error; otherwise they are reported
as indistinguishable at this sample size). Nothing in it is written in advance.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

DEFAULT_COLLAPSE_D_LOSS = 0.05  # the trainer's apt.collapse_d_loss default


# --------------------------------------------------------------------------------------------------
# Section builders
# --------------------------------------------------------------------------------------------------


def markdown_section(title: str, text: str) -> dict[str, Any]:
    return {"type": "markdown", "title": title, "text": text}


def r1_ablation_section(with_r1: str | Path, without_r1: str | Path, *, key: str = "d_adv",
                        threshold: float | None = None, title: str = "Approximated R1 ablation (paper Fig. 5)"
                        ) -> dict[str, Any]:
    """``with_r1`` / ``without_r1``: a run folder or its ``metrics.jsonl``. The collapse threshold is
    read from the no-aR1 run's ``config.yaml`` (``apt.collapse_d_loss``) unless given."""
    return {"type": "r1_ablation", "title": title, "with_r1": str(with_r1), "without_r1": str(without_r1),
            "key": key, "threshold": threshold}


def grids_section(grids: dict[str, Any], *, title: str = "Samples", caption: str = "") -> dict[str, Any]:
    """``grids``: name -> an existing PNG path, or videos ``[B, C, T, H, W]`` in [-1, 1] (saved with
    ``megatron_apt.inference.grid.save_grid``)."""
    return {"type": "grids", "title": title, "grids": grids, "caption": caption}


def training_section(runs: dict[str, str | Path], *, title: str = "Training curves") -> dict[str, Any]:
    """``runs``: name -> a run folder (or its metrics.jsonl); each gets the PNGs of
    :func:`megatron_apt.metrics.plots.plot_run` (losses, logit gap, aR1, gradient norms, throughput, memory)."""
    return {"type": "training", "title": title, "runs": {k: str(v) for k, v in runs.items()}}


def metrics_section(metrics: dict[str, Any], *, title: str = "Metrics") -> dict[str, Any]:
    """``metrics``: ``{"real": {...}, "models": {name: {...}}, "config": {...}}`` as written by evaluate."""
    return {"type": "metrics", "title": title, "metrics": metrics}


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------


def _metrics_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "metrics.jsonl" if p.is_dir() else p


def read_metrics_jsonl(path: str | Path, key: str = "d_adv") -> tuple[list[int], list[float], list[dict[str, Any]]]:
    """Steps and values of ``key`` (the last record wins for a step logged twice, e.g. after a resume)."""
    f = _metrics_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist")
    by_step: dict[int, dict[str, Any]] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and "step" in rec and isinstance(rec.get(key), (int, float)):
            by_step[int(rec["step"])] = rec
    steps = sorted(by_step)
    return steps, [float(by_step[s][key]) for s in steps], [by_step[s] for s in steps]


def _collapse_threshold(path: str | Path) -> float:
    f = _metrics_file(path).parent / "config.yaml"
    if f.is_file():
        m = re.search(r"^\s*collapse_d_loss:\s*([0-9.eE+-]+)\s*$", f.read_text(encoding="utf-8"), re.M)
        if m:
            try:
                return float(m.group(1))
            except ValueError:
                pass
    return DEFAULT_COLLAPSE_D_LOSS


def summarize_curve(steps: Sequence[int], values: Sequence[float], records: Sequence[dict[str, Any]] = ()
                    ) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"n": 0}
    tail = max(1, len(finite) // 10)
    return {"n": len(values), "first": finite[0], "final": sum(finite[-tail:]) / tail, "min": min(finite),
            "max": max(finite), "last_step": int(steps[-1]), "first_step": int(steps[0]),
            "collapse_warning": any(bool(r.get("collapse_warning")) for r in records)}


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _pm(v: Any, s: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if s is None or not math.isfinite(s):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ± {s:.{digits}f}"


def _pm_pct(v: Any, s: Any) -> str:
    if v is None:
        return "–"
    if s is None or not math.isfinite(s):
        return f"{100 * v:.1f}%"
    return f"{100 * v:.1f}% ± {100 * s:.1f}"


def cfg_label(cfg, interval=None) -> str:
    """A guidance scale as shown in reports: '7.5', or '7.5 in (0, 0.5]' when it was applied only on a guidance
    interval of t."""
    text = str(cfg)
    return text if not interval else f"{text} in ({interval[0]:g}, {interval[1]:g}]"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: the real held-out row (the floor) then each model; columns without numbers are left out."""
    real = metrics.get("real") or {}
    models = metrics.get("models") or {}
    cfg = metrics.get("config") or {}
    real_name = "real (held-out)" if cfg.get("reference_disjoint", True) else "real (in the reference)"
    rows_in = ([(real_name, {"kind": "data", "steps": "–", "cfg": "–", **real})] if real else []) + \
        list(models.items())

    def sharp(m):
        r = m.get("sharpness_ratio")
        return f"{_f(m.get('sharpness'), 4)} ({_f(r, 2)}×)" if r is not None else _f(m.get("sharpness"), 4)

    columns = [
        ("kind", None, lambda m: str(m.get("kind", ""))),
        ("steps", None, lambda m: str(m.get("steps", ""))),
        ("cfg", None, lambda m: cfg_label(m.get("cfg", ""), m.get("guidance_interval"))),
        ("FD video ↓", "fd", lambda m: _pm(m.get("fd"), m.get("fd_std"))),
        ("FD frames ↓", "fd_frames", lambda m: _pm(m.get("fd_frames"), m.get("fd_frames_std"))),
        ("text acc ↑", "text_acc", lambda m: _pm_pct(m.get("text_acc"), m.get("text_se"))),
        ("motion acc ↑", "motion_acc", lambda m: _pm_pct(m.get("motion_acc"), m.get("motion_se"))),
        ("sharpness (ratio to real)", "sharpness", sharp),
        ("no-digit frames", "none_rate", lambda m: _f(m.get("none_rate"), pct=True)),
        ("colour sat.", "saturation", lambda m: _f(m.get("saturation"), 3)),
        ("FID ↓", "fid", lambda m: _f(m.get("fid"), 2)),
        ("PFID ↓", "pfid", lambda m: _f(m.get("pfid"), 2)),
        ("CLIP ↑", "clip_score", lambda m: _f(m.get("clip_score"), 2)),
        ("s / sample", "seconds_per_sample", lambda m: _f(m.get("seconds_per_sample"), 3)),
    ]
    columns = [c for c in columns if c[1] is None or any(m.get(c[1]) is not None for _, m in rows_in)]
    head = ["model"] + [c[0] for c in columns]
    rows = [head, ["---"] * len(head)]
    for name, m in rows_in:
        rows.append([name] + [c[2](m) for c in columns])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# --------------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------------


def _role(models: dict[str, Any], kind: str, steps: int | None = None, largest: bool = False) -> str | None:
    cands = [(n, m) for n, m in models.items() if m.get("kind") == kind and (steps is None or m.get("steps") == steps)]
    if not cands:
        return None
    if largest:
        cands.sort(key=lambda nm: -int(nm[1].get("steps") or 0))
    return cands[0][0]


def _compare(models: dict[str, Any], a: str, b: str, key: str, se_key: str, lower_better: bool, label: str,
             pct: bool = False) -> str | None:
    ma, mb = models[a], models[b]
    va, vb = ma.get(key), mb.get(key)
    if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
        return None
    sa, sb = (ma.get(se_key), mb.get(se_key)) if se_key else (None, None)
    se = math.sqrt((sa or 0.0) ** 2 + (sb or 0.0) ** 2) if sa is not None and sb is not None else float("nan")
    fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.1f}")
    text = f"{label} {fmt(va)} for {a} vs {fmt(vb)} for {b}"
    if math.isfinite(se) and se > 0 and abs(va - vb) <= 2 * se:
        return text + f": no clear difference (within 2 standard errors, ±{fmt(2 * se)})"
    if va == vb:
        return text + ": equal"
    better = (va < vb) if lower_better else (va > vb)
    return text + f": {a} is {'better' if better else 'worse'}"


def metrics_findings(metrics: dict[str, Any], label: str = "") -> list[str]:
    models = metrics.get("models") or {}
    real = metrics.get("real") or {}
    cfg = metrics.get("config") or {}
    pre = f"[{label}] " if label else ""
    out: list[str] = []
    acc = (cfg.get("classifier") or {}).get("heldout_acc")
    if acc is not None:
        out.append(pre + f"The digit classifier reads {100 * acc:.1f}% of held-out toy frames correctly"
                   + ("" if acc >= 0.9 else " (below 90%: the alignment numbers are unreliable)") + ".")
    if not models:
        return out
    apt1 = _role(models, "generator", 1)
    apt2 = _role(models, "generator", 2)
    cd1 = _role(models, "consistency", 1)
    diff = _role(models, "diffusion", largest=True)
    pairs = [(apt1, cd1, "1-step APT vs 1-step CD"), (apt1, diff, "1-step APT vs the diffusion baseline"),
             (apt2, apt1, "2-step vs 1-step APT"), (cd1, diff, "1-step CD vs the diffusion baseline")]
    pairs += [tuple(c) for c in metrics.get("compare", [])]  # extra (a, b, label) pairs chosen by the caller
    done = set()
    for a, b, what in pairs:
        if not a or not b or a == b or a not in models or b not in models or (a, b) in done:
            continue
        done.add((a, b))
        bits = [_compare(models, a, b, "fd", "fd_std", True, "FD"),
                _compare(models, a, b, "text_acc", "text_se", False, "text alignment", pct=True),
                _compare(models, a, b, "motion_acc", "motion_se", False, "motion alignment", pct=True),
                _compare(models, a, b, "fid", "", True, "FID (no error bar)"),
                _compare(models, a, b, "pfid", "", True, "PFID (no error bar)"),
                _compare(models, a, b, "clip_score", "", False, "CLIP score (no error bar)")]
        bits = [x for x in bits if x]
        if bits:
            out.append(pre + f"{what}: " + "; ".join(bits) + ".")
    fds = {n: m["fd"] for n, m in models.items() if m.get("fd") is not None}
    if fds:
        best = min(fds, key=fds.get)
        floor = real.get("fd")
        s = f"Lowest FD: {best} ({fds[best]:.1f})"
        sb = models[best].get("fd_std") or 0.0
        tied = [n for n, v in fds.items() if n != best and abs(v - fds[best]) <= 2 * math.hypot(
            sb, models[n].get("fd_std") or 0.0)]
        if tied:
            s += f", not clearly below {', '.join(tied)}"
        if floor is not None:
            what = "videos" if (real.get("frames") or 1) > 1 else "images"
            if cfg.get("reference_disjoint", True):
                s += (f"; real held-out {what} score {floor:.1f} against the same reference (the floor at this "
                      "sample size)")
            else:
                s += (f"; real {what} score {floor:.1f}, but they are part of the reference (too few real samples "
                      "for a held-out set), so this floor is optimistic")
            far = [n for n, v in fds.items() if v > 3 * floor]
            if far and len(far) == len(fds):
                s += "; every model is more than 3x the floor: none is close to the data yet"
        out.append(pre + s + ".")
    sharp = []
    for n, m in models.items():
        r = m.get("sharpness_ratio")
        if r is None:
            continue
        if r > 1.5:
            sharp.append(f"{n} {r:.2f}x (high-frequency noise or artefacts)")
        elif r < 1 / 1.5:
            sharp.append(f"{n} {r:.2f}x (blurrier)")
    if sharp:
        out.append(pre + "Sharpness far from the real data's: " + ", ".join(sharp) + ".")
    elif any(m.get("sharpness_ratio") is not None for m in models.values()):
        out.append(pre + "Every model's sharpness is within 1.5x of the real data's.")
    grey = (real.get("saturation") or 0) < 0.05
    col = [n for n, m in models.items() if grey and (m.get("saturation") or 0) > 0.1]
    if col:
        kinds = []
        for n in col:
            r = models[n].get("sharpness_ratio")
            look = "coloured noise" if r is not None and r > 1.5 else (
                "flat colour, the look of a collapsed generator (paper Fig. 5)" if r is not None and r < 1 / 1.5
                else "coloured output")
            kinds.append(f"{n} ({look})")
        out.append(pre + "Colour on grey data (saturation > 0.1): " + ", ".join(kinds) + ".")
    return out


def ablation_findings(with_s: dict[str, Any], without_s: dict[str, Any], threshold: float, key: str = "d_adv"
                      ) -> list[str]:
    name = "D's adversarial loss" if key == "d_adv" else key
    missing = [lab for lab, s in (("with aR1", with_s), ("without aR1", without_s)) if not s.get("n")]
    if missing:
        return [f"The aR1 ablation cannot be judged: the {' and the '.join(missing)} run logged no {key}."]
    w, n = with_s, without_s
    collapsed = n["final"] < threshold or n.get("collapse_warning")
    s = (f"Without aR1, {name} went from {n['first']:.3f} (step {n['first_step']}) to {n['final']:.3f} "
         f"(step {n['last_step']}; minimum {n['min']:.3f}), ")
    if collapsed:
        s += f"below the collapse threshold {threshold:g}: the discriminator collapsed, as in the paper's Fig. 5."
    else:
        s += f"staying above the collapse threshold {threshold:g}: no collapse at this scale and length."
    s2 = f"With aR1 it ended at {w['final']:.3f} (minimum {w['min']:.3f})"
    if w["final"] < threshold or w.get("collapse_warning"):
        s2 += f", also below {threshold:g}: aR1 did not prevent the collapse here."
    else:
        rel = "lower" if n["final"] < w["final"] else "higher"
        s2 += f"; the no-aR1 run ends {rel} ({n['final']:.3f} vs {w['final']:.3f})."
    out = [s, s2]
    if min(n["last_step"], w["last_step"]) < 50:
        out.append(f"These runs are short ({min(n['last_step'], w['last_step'])} steps): "
                   "too short to conclude anything about collapse.")
    return out


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_ablation(curves: dict[str, tuple[list[int], list[float]]], gaps: dict[str, tuple[list[int], list[float]]],
                  threshold: float, path: Path, key: str = "d_adv") -> Path:
    plt = _plt()
    ncols = 2 if any(v[0] for v in gaps.values()) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), squeeze=False)
    colours = {"with aR1": "tab:green", "without aR1": "black"}
    ax = axes[0, 0]
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, color=colours.get(label), lw=1.6, marker="." if len(x) < 30 else None)
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"collapse threshold {threshold:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("D adversarial loss" if key == "d_adv" else key)
    ax.set_ylim(bottom=0)
    ax.set_title("Discriminator loss with / without approximated R1")
    ax.legend(fontsize=8)
    if ncols == 2:
        ax = axes[0, 1]
        for label, (x, y) in gaps.items():
            if x:
                ax.plot(x, y, label=label, color=colours.get(label), lw=1.6, marker="." if len(x) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("D(real) - D(fake) logit gap")
        ax.set_title("Logit gap")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(metrics: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    models = metrics.get("models") or {}
    real = metrics.get("real") or {}
    names = (["real"] if real else []) + list(models)
    rows = ([real] if real else []) + list(models.values())
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.6))
    x = list(range(len(names)))
    fd = [m.get("fd") or 0.0 for m in rows]
    err = [m.get("fd_std") if m.get("fd_std") is not None and math.isfinite(m.get("fd_std")) else 0.0 for m in rows]
    axes[0].bar(x, fd, yerr=err, color=["grey" if n == "real" else "tab:blue" for n in names], capsize=3)
    axes[0].set_xticks(x, names, rotation=20, fontsize=8)
    axes[0].set_ylabel("FD (video features) ↓")
    axes[0].set_title("Fréchet distance to real")
    w = 0.38
    ta = [m.get("text_acc") or 0.0 for m in rows]
    ma = [m.get("motion_acc") or 0.0 for m in rows]
    axes[1].bar([i - w / 2 for i in x], ta, w, label="text (digit) alignment")
    if any(m.get("motion_acc") is not None for m in rows):
        axes[1].bar([i + w / 2 for i in x], ma, w, label="motion alignment")
    axes[1].set_xticks(x, names, rotation=20, fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("fraction ↑")
    axes[1].set_title("Alignment with the caption")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "section"


def write_report(out_dir: str | Path, sections: Sequence[dict[str, Any]], *, title: str = "Evaluation report",
                 intro: str = "", findings: bool = True) -> Path:
    """Render ``sections`` into ``out_dir/report.md`` (plots in ``out_dir/plots``, grids in ``out_dir/grids``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body: list[str] = []
    found: list[str] = []
    used: set[str] = set()
    seen_classifier: set[str] = set()

    def unique(stem: str) -> str:
        s, i = stem, 2
        while s in used:
            s, i = f"{stem}_{i}", i + 1
        used.add(s)
        return s

    for sec in sections:
        kind = sec.get("type")
        title_s = sec.get("title", "")
        body.append(f"## {title_s}\n")
        if kind == "markdown":
            body.append(sec.get("text", "").rstrip() + "\n")
        elif kind == "r1_ablation":
            key = sec.get("key", "d_adv")
            thr = sec.get("threshold")
            thr = float(thr) if thr is not None else _collapse_threshold(sec["without_r1"])
            curves, gaps, summ = {}, {}, {}
            for label, src in (("with aR1", sec["with_r1"]), ("without aR1", sec["without_r1"])):
                steps, vals, recs = read_metrics_jsonl(src, key)
                curves[label] = (steps, vals)
                gaps[label] = ([s for s, r in zip(steps, recs) if "logit_gap" in r],
                               [float(r["logit_gap"]) for r in recs if "logit_gap" in r])
                summ[label] = summarize_curve(steps, vals, recs)
            png = plot_ablation(curves, gaps, thr, out / "plots" / f"{unique('r1_ablation')}.png", key)
            body.append(f"![D loss with and without aR1]({png.relative_to(out).as_posix()})\n")
            body.append(f"Sources: with aR1 `{sec['with_r1']}`, without aR1 `{sec['without_r1']}`.\n")
            body.append("| run | logged points | first | final (mean of last 10%) | min | last step |\n"
                        "| --- | --- | --- | --- | --- | --- |")
            for label, s in summ.items():
                if s.get("n"):
                    body.append(f"| {label} | {s['n']} | {s['first']:.4f} | {s['final']:.4f} | {s['min']:.4f} | "
                                f"{s['last_step']} |")
            body.append("")
            found += ablation_findings(summ["with aR1"], summ["without aR1"], thr, key)
        elif kind == "training":
            from megatron_apt.metrics.plots import plot_run

            body.append("Each run's metrics.jsonl over steps (`tools/plot_run.py RUN_DIR` draws the same).\n")
            for name, src in sec.get("runs", {}).items():
                try:
                    pngs = plot_run(src, out / "plots" / unique(f"training_{_slug(name)}"))
                except FileNotFoundError as e:
                    body.append(f"**{name}**: {e}\n")
                    continue
                body.append(f"**{name}** (`{src}`)\n")
                body += [f"![{name}: {p.stem}]({p.relative_to(out).as_posix()})" for p in pngs]
                body.append("")
        elif kind == "grids":
            from megatron_apt.inference.grid import save_grid

            if sec.get("caption"):
                body.append(sec["caption"].rstrip() + "\n")
            for name, g in sec.get("grids", {}).items():
                if isinstance(g, (str, Path)):
                    p = Path(g)
                    if not p.is_file():
                        body.append(f"**{name}**: grid {p} is missing\n")
                        continue
                    try:
                        rel = p.resolve().relative_to(out.resolve()).as_posix()
                    except ValueError:
                        dst = out / "grids" / f"{unique(_slug(title_s + '_' + name))}.png"
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        dst.write_bytes(p.read_bytes())
                        rel = dst.relative_to(out).as_posix()
                else:
                    dst = save_grid(g, out / "grids" / f"{unique(_slug(title_s + '_' + name))}.png", max_frames=8,
                                    scale=4)
                    rel = dst.relative_to(out).as_posix()
                body.append(f"**{name}**\n\n![{name}]({rel})\n")
        elif kind == "metrics":
            m = sec["metrics"]
            cfg = m.get("config") or {}
            desc = []
            if cfg.get("real"):
                refn = cfg.get("n_reference")
                overlap = "" if cfg.get("reference_disjoint") else ", overlapping the prompts"
                desc.append(f"real data: `{cfg['real']}`"
                            + (f" ({refn} reference samples{overlap})" if refn is not None else ""))
            if cfg.get("n"):
                desc.append(f"{cfg['n']} prompts from the real captions, seed {cfg.get('seed', 0)}")
            if cfg.get("frames"):
                desc.append(f"{cfg['frames']} frame(s) of {cfg.get('width', '?')}x{cfg.get('height', '?')}")
            if desc:
                body.append("; ".join(desc) + ".\n")
            body.append(metrics_table(m) + "\n")
            body.append("FD: Fréchet distance in the toy digit classifier's penultimate features (video: frame "
                        "features averaged per video; frames: per frame), ± bootstrap std over the generated "
                        "samples. Text acc: frames where the captioned digit is read. Motion acc: videos whose "
                        "tracked centre of mass moves the captioned way. Sharpness: Laplacian variance, closer to "
                        "real is better. ± values are standard errors.\n")
            if m.get("real_metrics_note"):
                body.append(m["real_metrics_note"] + "\n")
            if m.get("models"):
                png = plot_metrics(m, out / "plots" / f"{unique('metrics_' + _slug(title_s))}.png")
                body.append(f"![metrics]({png.relative_to(out).as_posix()})\n")
            for line in metrics_findings(m, sec.get("label", "")):
                core = re.sub(r"^\[[^]]*\] ", "", line)
                if core.startswith("The digit classifier") and core in seen_classifier:
                    continue
                seen_classifier.add(core)
                found.append(line)
        else:
            raise ValueError(f"unknown report section type {kind!r}")
    lines = [f"# {title}\n"]
    if intro:
        lines.append(intro.rstrip() + "\n")
    if findings and found:
        lines.append("## Findings\n")
        lines.append("Computed from the numbers below; a difference is called only beyond two standard errors "
                     "(bootstrap for FD).\n")
        lines += [f"- {f}" for f in found]
        lines.append("")
    lines += body
    path = out / "report.md"
    from megatron_apt.utils import atomic_write

    with atomic_write(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
