"""tools/evaluate.py under torchrun: 2 gloo ranks each generate and score (FID features, CLIP) their share of
the batches, rank 0 gathers them; the metrics and sample grids equal those of one process."""

import json
from pathlib import Path

import pytest

from tests.helpers.fixtures import FAKE_EVAL_NETS
from tests.helpers.ranks import run_distributed

pytestmark = pytest.mark.distributed


def _evaluate(rank, world, args):
    from megatron_apt.cli import evaluate
    from megatron_apt.metrics import toy_eval

    shares = []
    real = toy_eval.generate_batches

    def counting(*a, **k):  # which batches this rank generated
        batches, secs = real(*a, **k)
        shares.append([b for b, _ in batches])
        return batches, secs

    toy_eval.generate_batches = counting
    rc = evaluate.main(args)
    out = Path(args[args.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text()) if rank == 0 else None
    return rc, shares, metrics


def _strip_timing(m):
    m.pop("elapsed_s")
    for s in m.values():
        s["config"]["classifier"].pop("train_seconds")
        for row in s["models"].values():
            row.pop("seconds_per_sample")
    return m


def test_two_ranks_equal_one(tmp_path):
    from megatron_apt.data.toy import ToyConfig, make_toy_dataset
    from megatron_apt.checkpoint.model_dir import save_mmdit
    from megatron_apt.models.build import build_mmdit

    make_toy_dataset(tmp_path / "real", ToyConfig(num=16, size=24, frames=4, fps=4, min_digit=8, max_digit=10,
                                                  max_digits=1, seed=0))
    save_mmdit(build_mmdit("toy", seed=3), tmp_path / "gen", kind="generator")
    save_mmdit(build_mmdit("toy", seed=4), tmp_path / "diff", kind="diffusion")
    (tmp_path / "nets.py").write_text(FAKE_EVAL_NETS)
    args = ["--real", tmp_path / "real", "--prompts-from-real", "6", "--batch-size", "2", "--cache-dir",
            tmp_path / "cache", "--model", f"g={tmp_path / 'gen'}:1", "--model", f"d={tmp_path / 'diff'}:2:2.0",
            "--fid-features", f"{tmp_path / 'nets.py'}:feats", "--fid-input-range", "unit",
            "--clip", f"{tmp_path / 'nets.py'}:clip"]
    args = [str(x) for x in args]
    one = run_distributed(_evaluate, 1, args + ["--out", str(tmp_path / "one")], timeout=600)
    two = run_distributed(_evaluate, 2, args + ["--out", str(tmp_path / "two")], timeout=600)
    assert [r[0] for r in one + two] == [0, 0, 0]
    # 3 batches of 2 prompts per model: rank 0 made batches 0 and 2, rank 1 batch 1; one process all three
    assert one[0][1] == [[0, 1, 2]] * 2
    assert two[0][1] == [[0, 2]] * 2 and two[1][1] == [[1]] * 2
    assert (tmp_path / "two" / "report.md").is_file()
    m1, m2 = _strip_timing(one[0][2]), _strip_timing(two[0][2])
    assert m1 == m2
    row = m2["eval"]["models"]["d"]
    assert row["fid"] > 0 and row["clip_score"] > 0 and row["fd"] > 0 and row["text_acc"] is not None
    grids1 = sorted((tmp_path / "one" / "grids").glob("*.png"))
    grids2 = sorted((tmp_path / "two" / "grids").glob("*.png"))
    assert [p.name for p in grids1] == [p.name for p in grids2] and len(grids1) == 3
    for a, b in zip(grids1, grids2):
        assert a.read_bytes() == b.read_bytes(), a.name
    # and both are what one in-process generate_set call makes (prompts and noise in batch order)
    import torch

    from megatron_apt.inference.grid import save_grid
    from megatron_apt.metrics import toy_eval as te

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = te.load_real(str(tmp_path / "real")).captions[:6]
        videos, _ = te.generate_set(te.parse_model_spec(f"d={tmp_path / 'diff'}:2:2.0"), prompts, 4, 24, 24,
                                    batch_size=2)
    finally:
        torch.set_num_threads(threads)
    ref = save_grid(videos[:8], tmp_path / "ref.png", max_frames=8, scale=4)
    assert ref.read_bytes() == next(p for p in grids2 if "_d_" in p.name).read_bytes()
