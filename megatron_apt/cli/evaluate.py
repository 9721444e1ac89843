"""Compare generators on real data: toy metrics (on the moving-digits toy data, unless --no-toy-metrics),
FID / patch FID / CLIP score (when you provide the networks), a metrics table and a Markdown report with
plots (the aR1 ablation of the paper's Fig. 5 with --fig5).

    # any set of models against real toy data (a preprocessed pixel prefix or a raw toy folder)
    python tools/evaluate.py --real RUN/data/videos --prompts-from-real 48 --out RUN/eval \\
        --model diffusion25=DIFF:25:7.5 --model cd1=RUN/cd/export/model_ema:1 \\
        --model apt1=RUN/apt_video/export/generator_ema:1 --model apt2=RUN/apt_video/export/generator_ema:2 \\
        --fig5 RUN/apt_image RUN/apt_image_no_r1

    # everything the quickstart trained (video and image sets, the aR1 ablation, the training curves)
    python tools/evaluate.py --quickstart RUN --diffusion DIFF --num 48 --out RUN/report

    # the same on 8 processes: each generates (and scores with --fid-features / --clip) its share of the
    # batches; rank 0 gathers them and writes the report, identical to one process's
    torchrun --nproc_per_node 8 tools/evaluate.py --quickstart RUN --diffusion DIFF --num 48 --out RUN/report

--model is NAME=DIR[:steps[:cfg[:LO-HI]]]; without steps a generator/consistency model takes 1 step and a
diffusion model 25 steps with CFG 7.5; LO-HI applies the guidance only at the steps whose t is in (LO, HI].
Every model gets the same prompts (the captions of the first N real samples) and the same noise. The real
samples after those N form the reference set (when there are at least 2N; otherwise all real samples are the
reference and the "real" row is not held out).

Toy metrics (megatron_apt/metrics/toy_eval.py): Fréchet distance in the feature space of a digit
classifier that is trained on the spot (seconds; cached as safetensors in --cache-dir), text alignment
(is the captioned digit read), motion alignment (does the tracked digit move the captioned way; videos
only), sharpness against the real data's.

Real-data metrics (megatron_apt/metrics/real_eval.py, paper Appendix A) need local networks; nothing is
downloaded:
  --fid-features  a TorchScript file or a 'module:function' / 'file.py:function' factory returning a
                  callable images [N, 3, 299, 299] -> features [N, D]: for numbers comparable to
                  published FIDs this must be the standard FID Inception-v3 (2048-d pool features).
                  --fid-input-range says what it takes (uint8 / float255 / unit), --fid-kwargs extra
                  call arguments as JSON (e.g. '{"return_features": true}').
  --clip          a local transformers CLIPModel directory (e.g. a copy of
                  laion/CLIP-ViT-g-14-laion2B-s12B-b42K, the paper's) or a factory returning an object
                  with encode_image(list of uint8 HxWx3) and encode_text(list of str).
FID resizes centre-cropped squares to 299 px; PFID takes centred 299 px patches without resizing
(frames smaller than 299 px are bilinearly upsampled to 1024 px first, as the paper does for 512 px
models). The FID reference is the reference part of --real (or --fid-real: any folder / CSV / JSONL of
images or videos, any sizes). FID is strongly biased at small sample counts: the paper uses 5,000 and
10,000 COCO captions (give them as --real CAPTIONS.csv|jsonl with --no-toy-metrics, or --real with the
captions and --fid-real with the images). At the toy's 24 px these numbers mean little.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from megatron_apt.config.train import ATTENTION_BACKENDS
from megatron_apt.utils import get_logger, setup_logging

from megatron_apt.utils import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (metrics.json, metrics.md, report.md, plots, grids)")
    p.add_argument("--real", help="real data: a preprocessed pixel data set prefix, or a raw folder (toy: "
                                   "mp4/png + .txt captions, metadata.jsonl); with --no-toy-metrics also a "
                                   "CSV/JSONL of path,caption of any sizes (give --resolution/--frames)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR[:steps[:cfg[:LO-HI]]]",
                   help="a model to evaluate (repeatable)")
    p.add_argument("--prompts-from-real", type=int, default=48, metavar="N",
                   help="generate one sample per caption of the first N real samples")
    p.add_argument("--reference-max", type=int, default=1024,
                   help="at most this many real samples as the reference (toy: those after the N prompt samples; "
                        "FID: the first ones of --fid-real or --real, i.e. the prompts' own images, as the paper "
                        "does on COCO)")
    p.add_argument("--fig5", nargs=2, metavar=("WITH_R1", "WITHOUT_R1"),
                   help="two APT run folders (or metrics.jsonl files) for the aR1 ablation plot (paper Fig. 5)")
    p.add_argument("--quickstart", metavar="RUN", help="evaluate everything examples/quickstart.sh wrote in RUN "
                   "(and any --model beside it)")
    p.add_argument("--diffusion", help="with --quickstart: the diffusion model the run started from")
    p.add_argument("--num", type=int, help="with --quickstart: prompts per set (same as --prompts-from-real)")
    p.add_argument("--cache-dir", help="where the toy classifier is cached (default: RUN/eval_cache with "
                                       "--quickstart, else OUT/cache)")
    p.add_argument("--no-toy-metrics", action="store_true", help="skip the toy metrics (real models and data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of the diffusion baseline's "
                   "classifier-free guidance (the CD teacher's fixed negative prompt); empty = the null text")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-encoder", default="bytes", help="text encoder or tokenizer directory, or 'bytes'")
    p.add_argument("--vae", default="none", help="diffusers VAE directory, or 'none' for a pixel-space model")
    p.add_argument("--max-text-len", type=int, default=512)
    p.add_argument("--resolution", help="WIDTHxHEIGHT to generate (default: the real data's)")
    p.add_argument("--frames", type=int, help="frames to generate (default: the real data's)")
    p.add_argument("--device", default=None)
    p.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS),
                   default=os.environ.get("MEGATRON_APT_ATTN", "auto"),
                   help="attention kernel (as model.attention_backend in training; default $MEGATRON_APT_ATTN, else "
                        "auto: the fastest available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--min-motion-px", type=float, default=1.0, help="displacement under this counts as static")
    p.add_argument("--fid-features", help="local feature network for FID/PFID (see above)")
    p.add_argument("--fid-input-range", choices=["uint8", "float255", "unit"], default="uint8")
    p.add_argument("--fid-kwargs", default="", help="JSON dict of extra keyword arguments for the feature network")
    p.add_argument("--fid-real", help="real images/videos for FID (default: --real)")
    p.add_argument("--pfid-upsample-to", type=int, default=None,
                   help="upsample generated frames to this shorter side before the 299 px patch (default: 1024 "
                        "when frames are smaller than 299 px)")
    p.add_argument("--clip", help="local CLIP model for the CLIP score (see above)")
    return p.parse_args(argv)


_log = get_logger("megatron_apt.evaluate")


def log(msg: str) -> None:
    _log.info("%s", msg)


def _gather(obj, rank: int, world: int) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def generate_models(a, specs, label, prompts, frames, h, w, device, dtype, feature_net, clip, keep, rank, world):
    """Every model's samples for the prompts, each rank generating its share of the batches (and scoring it
    with the FID / CLIP networks); on rank 0 {name: (videos kept, seconds per sample, RealMetrics or None)},
    on the other ranks {}. The batches, seeds and so the samples are those of one process."""
    from megatron_apt.metrics import real_eval as rev
    from megatron_apt.metrics import toy_eval as te

    out = {}
    for spec in specs:
        t0 = time.perf_counter()
        acc = rev.RealMetrics(feature_net, clip, a.pfid_upsample_to) if feature_net or clip else None

        def on_batch(v, batch, acc=acc):
            acc.add(rev.frames_as_images(v), [c for c in batch for _ in range(v.shape[2])])

        batches, secs = te.generate_batches(spec, prompts, frames, h, w, seed=a.seed, batch_size=a.batch_size,
                                            text=a.text_encoder, vae=a.vae, device=device, dtype=dtype,
                                            max_text_len=a.max_text_len, on_batch=on_batch if acc else None,
                                            keep=keep, rank=rank, world=world, desc=f"{label}: {spec.name}",
                                            negative_prompt=a.negative_prompt)
        ids = list(range(rank, -(-len(prompts) // a.batch_size), world))  # this rank's batches, in order
        share = {"batches": batches, "secs": secs, "ids": ids,
                 "acc": [acc.fid_f, acc.pfid_f, acc.img_e, acc.txt_e] if acc else None}
        parts = _gather(share, rank, world)
        if rank != 0:
            continue
        kept = sorted(((b, v) for part in parts for b, v in part["batches"]), key=lambda bv: bv[0])
        videos = torch.cat([v for _, v in kept])
        merged = None
        if acc is not None:  # the per-batch features of every rank, in batch order
            merged = rev.RealMetrics(feature_net, clip, a.pfid_upsample_to)
            lists = [merged.fid_f, merged.pfid_f, merged.img_e, merged.txt_e]
            for k, dst in enumerate(lists):
                by_batch = {b: x for part in parts for b, x in zip(part["ids"], part["acc"][k])}
                dst.extend(by_batch[b] for b in sorted(by_batch))
        secs_per_sample = sum(part["secs"] for part in parts) / max(1, len(prompts))
        out[spec.name] = (videos, secs_per_sample, merged)
        log(f"{label}: {spec.name} ({spec.steps} steps, cfg {spec.cfg_label()}): {len(prompts)} samples in "
            f"{time.perf_counter() - t0:.1f} s" + (f" on {world} ranks" if world > 1 else ""))
    return out


def evaluate_set(a, real_spec: str, specs, label: str, cache_dir: Path, n: int, device, dtype, feature_net=None,
                 clip=None, rank: int = 0, world: int = 1):
    """Generate with every model for the first n real captions and score. Returns (metrics, grids) on rank 0,
    (None, None) on the others. Under torchrun every rank generates (and scores with the FID / CLIP networks)
    its share of the batches; rank 0 gathers them and computes the set-level numbers."""
    from megatron_apt.metrics import real_eval as rev
    from megatron_apt.metrics import toy_eval as te

    t0 = time.perf_counter()
    toy = not a.no_toy_metrics
    if toy:
        real = te.load_real(real_spec, limit=n + a.reference_max)
        total, captions = len(real), real.captions
        n = min(n, total)
        disjoint = total >= 2 * n
        ref_idx = list(range(n, total)) if disjoint else list(range(total))
        held, ref = real.subset(range(n)), real.subset(ref_idx)
        h, w = held.size
        frames = held.frames
        n_ref = len(ref_idx)
    else:  # real data of any size: captions now, pixels streamed later (FID reference) and never all held
        captions = [c for _, c, _ in rev.iter_media(real_spec, n, decode=False)]
        n = len(captions)
        first = next(rev.iter_media(real_spec, 1))[0]
        frames, h, w = first.shape[:3]
        disjoint, n_ref = False, None
    prompts = captions[:n]
    if not all(prompts):
        raise ValueError(f"{real_spec}: some of the first {n} samples have no caption to use as a prompt")
    log(f"{label}: {n} prompts from {real_spec}" + (f", {n_ref} reference samples"
                                                     f"{'' if disjoint else ' (overlapping the prompts)'}"
                                                     if toy else "") + f" in {time.perf_counter() - t0:.1f} s")
    if a.resolution:
        try:
            w, h = (int(v) for v in a.resolution.lower().split("x"))
        except ValueError:
            raise ValueError(f"--resolution must look like 1280x720, got {a.resolution!r}") from None
    frames = a.frames or frames
    if toy and (h, w) != held.size:
        raise ValueError(f"the toy metrics need the real data's size {held.size[1]}x{held.size[0]}, got {w}x{h} "
                         "(or pass --no-toy-metrics)")
    generated = generate_models(a, specs, label, prompts, frames, h, w, device, dtype, feature_net, clip,
                                None if toy else 8, rank, world)
    if rank != 0:
        return None, None
    cfg = {"real": real_spec, "n": n, "n_reference": n_ref, "reference_disjoint": disjoint, "seed": a.seed,
           "frames": frames, "height": h, "width": w, "label": label}
    metrics = {"config": cfg, "real": {}, "models": {}}
    grids = {}
    evaluator = None
    if toy:
        grids["real data"] = held.videos[:8]
        evaluator = te.ToyEvaluator(ref, cache_dir=cache_dir, min_motion_px=a.min_motion_px, log=log)
        info = evaluator.classifier_info
        cfg["classifier"] = {k: info.get(k) for k in ("heldout_acc", "train_seconds", "cached", "settings")}
        log(f"{label}: classifier held-out accuracy {100 * info['heldout_acc']:.1f}% "
            f"({'from the cache' if info.get('from_cache') else 'trained and cached'}: {info.get('cached')})")
        metrics["real"] = te.public(evaluator.score(held, seed=a.seed))
    reference = None
    if feature_net is not None:
        t0 = time.perf_counter()
        if a.fid_real or not toy:
            src = a.fid_real or real_spec
            frames_iter = rev.iter_frames(src, a.reference_max)
        else:
            from megatron_apt.inference.grid import to_uint8

            src = f"{real_spec} (reference part)"
            frames_iter = (f for v in to_uint8(ref.videos) for f in v)
        reference = rev.reference_stats(frames_iter, feature_net)
        cfg["fid_reference"] = {"source": src, "frames": reference["count"]}
        metrics["real_metrics_note"] = (
            f"FID / PFID: {reference['count']} real frames from `{src}` against {n * frames} generated frames "
            f"(FID: centre square resized to 299 px; PFID: centred 299 px patch, frames under 299 px upsampled "
            f"to {a.pfid_upsample_to or 1024} px first). FID is biased at small counts: compare only equal counts.")
        log(f"{label}: FID reference statistics of {reference['count']} frames in {time.perf_counter() - t0:.1f} s")
    for spec in specs:
        videos, secs, acc = generated[spec.name]
        m = {"path": spec.path, "kind": spec.kind, "steps": spec.steps, "cfg": spec.cfg, "seconds_per_sample": secs}
        if spec.guidance_interval is not None:
            m["guidance_interval"] = list(spec.guidance_interval)
        if evaluator is not None:
            m.update(te.public(evaluator.score(te.VideoSet(videos, prompts), seed=a.seed)))
        if acc is not None:
            m.update(acc.result(reference))
        metrics["models"][spec.name] = m
        grids[f"{spec.name} ({spec.kind}, {spec.steps} step{'s' if spec.steps > 1 else ''}"
              f"{f', cfg {spec.cfg_label()}' if spec.cfg != 1 else ''})"] = videos[:8]
        shown = ", ".join(f"{k} {m[k]:.3g}" for k in ("fd", "text_acc", "motion_acc", "fid", "pfid", "clip_score")
                          if m.get(k) is not None)
        if shown:
            log(f"{label}: {spec.name}: {shown}")
    return metrics, grids


def cd_guidance_interval(config_yaml: Path):
    """The guidance interval a consistency distillation run used (its resolved config.yaml), or None when it
    guided at every step (or the file is missing)."""
    import yaml

    if not config_yaml.is_file():
        return None
    gi = ((yaml.safe_load(config_yaml.read_text()) or {}).get("cd") or {}).get("guidance_interval")
    return None if not gi or [float(v) for v in gi] == [0.0, 1.0] else (float(gi[0]), float(gi[1]))


def quickstart_plan(a):
    """The sets, models and ablation runs of a quickstart run folder (missing pieces are skipped)."""
    from megatron_apt.data import indexed
    from megatron_apt.metrics.toy_eval import parse_model_spec

    run = Path(a.quickstart)
    if not run.is_dir():
        raise FileNotFoundError(f"--quickstart {run} is not a folder")
    diff = a.diffusion or str(run / "diffusion" / "export" / "model_ema")
    notes = []

    def spec(name, path, steps, cfg=None):
        if not (Path(path) / "config.json").is_file():
            notes.append(f"{name}: {path} not found, skipped")
            return None
        return parse_model_spec(f"{name}={path}:{steps}" + (f":{cfg}" if cfg is not None else ""))

    def real(prefix, raw):
        if indexed.is_complete(str(run / "data" / prefix)):
            return str(run / "data" / prefix)
        if (run / "data" / raw).is_dir():
            return str(run / "data" / raw)
        notes.append(f"no {prefix} data in {run / 'data'}")
        return None

    cd = run / "cd" / "export" / "model_ema"
    teacher = [spec("diffusion25", diff, 25, 7.5)]
    interval = cd_guidance_interval(run / "cd" / "config.yaml")
    if interval is not None:  # the teacher also as consistency distillation saw it
        teacher.append(spec("diffusion25_gi", diff, 25, f"7.5:{interval[0]:g}-{interval[1]:g}"))
    sets = []
    rv = real("videos", "raw_videos")
    if rv:
        g = run / "apt_video" / "export" / "generator_ema"
        sets.append(("videos", rv, [s for s in (*teacher, spec("cd1", cd, 1), spec("apt1", g, 1), spec("apt2", g, 2))
                                    if s]))
    ri = real("images", "raw_images")
    if ri:
        sets.append(("images", ri, [s for s in (spec("diffusion25", diff, 25, 7.5), spec("cd1", cd, 1),
                                                spec("apt1", run / "apt_image" / "export" / "generator_ema", 1),
                                                spec("apt1_no_r1", run / "apt_image_no_r1" / "export" /
                                                     "generator_ema", 1)) if s]))
    fig5 = None
    w, wo = run / "apt_image" / "metrics.jsonl", run / "apt_image_no_r1" / "metrics.jsonl"
    if w.is_file() and wo.is_file():
        fig5 = (str(w), str(wo))
    else:
        notes.append("aR1 ablation runs (apt_image, apt_image_no_r1) not found: no Fig. 5 plot")
    return sets, fig5, notes


def quickstart_runs(a) -> dict[str, Path]:
    """The training runs of a quickstart folder whose metrics.jsonl exists, in recipe order (the shipped toy
    diffusion model's pretraining log when the run did not retrain it)."""
    run = Path(a.quickstart)
    runs = {}
    diff = Path(a.diffusion) if a.diffusion else None
    if (run / "diffusion" / "metrics.jsonl").is_file():
        runs["diffusion"] = run / "diffusion"
    elif diff is not None and (diff.parent / "pretrain_metrics.jsonl").is_file():
        runs["diffusion (shipped)"] = diff.parent / "pretrain_metrics.jsonl"
    for name in ("cd", "apt_image", "apt_image_no_r1", "apt_video"):
        if (run / name / "metrics.jsonl").is_file():
            runs[name] = run / name
    return runs


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv=None) -> int:
    a = parse_args(argv)
    from megatron_apt.metrics import report as rp
    from megatron_apt.metrics.toy_eval import parse_model_spec
    from megatron_apt.utils import atomic_write, atomic_write_json

    t_start = time.perf_counter()
    try:
        out = Path(a.out)
        if a.quickstart:
            if a.real:
                raise ValueError("--quickstart picks the data itself: drop --real")
            n = a.num or a.prompts_from_real
            sets, fig5, notes = quickstart_plan(a)
            # --model with --quickstart: models to score beside the run's own (e.g. the shipped generator)
            extra = [parse_model_spec(m) for m in a.model]
            sets = [(name, real, specs + extra) for name, real, specs in sets]
            cache_dir = Path(a.cache_dir) if a.cache_dir else Path(a.quickstart) / "eval_cache"
            if not sets:
                raise FileNotFoundError(f"nothing to evaluate in {a.quickstart}: " + "; ".join(notes))
        else:
            if not a.model and not a.fig5:
                raise ValueError("give at least one --model NAME=DIR[:steps[:cfg[:LO-HI]]] "
                                 "(or --fig5 for the ablation only)")
            if a.model and not a.real:
                raise ValueError("--real is required with --model (or use --quickstart RUN)")
            n = a.num or a.prompts_from_real
            specs = [parse_model_spec(m) for m in a.model]
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"model names must be unique, got {names}")
            sets = [("eval", a.real, specs)] if specs else []
            fig5 = tuple(a.fig5) if a.fig5 else None
            notes = []
            cache_dir = Path(a.cache_dir) if a.cache_dir else out / "cache"
        if n < 2:
            raise ValueError("need at least 2 prompts (--prompts-from-real / --num)")
        if a.no_toy_metrics and not (a.fid_features or a.clip):
            raise ValueError("--no-toy-metrics leaves nothing to measure: add --fid-features and/or --clip")
        rank, world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every rank generates its share
            from megatron_apt.parallel.state import init_distributed

            rank, world = init_distributed()
            setup_logging(rank)
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        from megatron_apt.models.attention import set_attention_backend

        chosen = set_attention_backend(a.attention_backend, device)
        log(f"attention backend {a.attention_backend}" + (f" -> {chosen}" if a.attention_backend == "auto" else ""))
        feature_net = clip = None
        if a.fid_features:
            from megatron_apt.metrics.real_eval import load_feature_extractor

            feature_net = load_feature_extractor(a.fid_features, device=device, input_range=a.fid_input_range,
                                                 call_kwargs=a.fid_kwargs)
        if a.clip:
            from megatron_apt.metrics.real_eval import load_clip

            clip = load_clip(a.clip, device=device)
        for note in notes:
            log(note)

        all_metrics: dict = {}
        sections: list = []
        md = ["# Metrics\n"]
        for label, real_spec, specs in sets:
            metrics, grids = evaluate_set(a, real_spec, specs, label, cache_dir, n, device, dtype, feature_net, clip,
                                          rank, world)
            if rank != 0:
                continue
            if label == "images":
                metrics["compare"] = [["apt1", "apt1_no_r1", "1-step APT with vs without aR1"]]
            all_metrics[label] = metrics
            title = {"videos": "Videos", "images": "Images", "eval": "Evaluation"}.get(label, label)
            sec = rp.metrics_section(metrics, title=f"{title}: metrics")
            sec["label"] = label if len(sets) > 1 else ""
            sections.append(sec)
            sections.append(rp.grids_section(grids, title=f"{title}: samples",
                                             caption="Rows: the first 8 prompts (same prompts and noise for every "
                                                     "model); columns: frames."))
            md.append(f"## {title}\n\n{rp.metrics_table(metrics)}\n")
        if rank != 0:
            return 0
        if a.quickstart:
            runs = quickstart_runs(a)
            if runs:
                sections.append(rp.training_section(runs))
        if fig5:
            sections.insert(0, rp.r1_ablation_section(fig5[0], fig5[1]))
            summ = {}
            for lab, src in (("with_r1", fig5[0]), ("without_r1", fig5[1])):
                steps, vals, recs = rp.read_metrics_jsonl(src)
                summ[lab] = {"source": src, **rp.summarize_curve(steps, vals, recs)}
            all_metrics["r1_ablation"] = summ
        if notes:
            sections.append(rp.markdown_section("Notes", "\n".join(f"- {x}" for x in notes)))
        out.mkdir(parents=True, exist_ok=True)
        all_metrics["elapsed_s"] = time.perf_counter() - t_start
        atomic_write_json(out / "metrics.json", all_metrics)
        with atomic_write(out / "metrics.md", "w") as f:
            f.write("\n".join(md))
        intro = ("Evaluation of the APT recipe" + ("" if a.no_toy_metrics else " on the moving-digits toy data")
                 + (". Every model generated for the captions of the same real samples, from the same noise"
                    if sets else "") + "; tools/evaluate.py --help says how each number is computed.")
        report = rp.write_report(out, sections, title="APT evaluation report", intro=intro)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {report} in {time.perf_counter() - t_start:.1f} s")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
