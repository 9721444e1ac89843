"""tools/plot_run.py / megatron_apt.metrics.plots: the PNGs of a run's metrics.jsonl over steps."""

import json
import math

import pytest
from PIL import Image

from megatron_apt.cli import plot_run as tool
from megatron_apt.metrics import plots


def _apt_run(path, steps=6, nan_step=3):
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "d_loss": 1.4 - 0.1 * s, "d_adv": 1.3 - 0.1 * s, "g_loss": 0.7 + 0.05 * s, "loss": 0.7,
               "ar1": 0.01 / s, "logit_real": 0.1 * s, "logit_fake": -0.1 * s, "logit_gap": 0.2 * s,
               "d_grad_norm": 2.0, "g_grad_norm": 1.0, "samples_per_s": 10.0 + s, "tflops": 0.5,
               "mfu": float("nan"), "peak_mem_gb": 1.5, "finite": True}
        if s == nan_step:
            rec.update(g_loss=float("nan"), finite=False)
        lines.append(json.dumps(rec))
    # a resumed run logs step 2 again (the last record wins), a crash cut the last line
    lines.insert(2, json.dumps({"step": 2, "d_loss": 5.0, "logit_gap": 9.0, "finite": True}))
    lines.append('{"step": 7, "d_lo')
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_apt_run_gets_every_plot_and_the_data_is_read_right(tmp_path):
    run = _apt_run(tmp_path / "apt")
    records = plots.read_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[1]["d_loss"] == 5.0  # step 2's later record
    xs, ys = plots.series(records, "g_loss")
    assert xs == [1, 3, 4, 5, 6] and math.isnan(ys[1])  # step 2's record has no g_loss
    assert plots.series([{"step": 1, "g_loss": None}], "g_loss")[1][0] != 0.0  # null reads as NaN
    written = plots.plot_run(run)
    assert [p.name for p in written] == ["losses.png", "logit_gap.png", "ar1.png", "grad_norm.png",
                                         "throughput.png", "memory.png"]
    for p in written:
        assert p.parent == run / "plots"
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (640, 360)
            assert len(set(im.convert("L").getdata())) > 20  # drawn, not blank


def test_flow_run_has_no_gan_panels_and_cli(tmp_path, capsys):
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 0.5,
                                                            "samples_per_s": 3.0, "tflops": 0.1,
                                                            "peak_mem_gb": 0.2}) + "\n" for s in range(1, 5)))
    apt = _apt_run(tmp_path / "apt")
    assert tool.main([str(flow), str(apt)]) == 0
    out = capsys.readouterr().out
    assert "losses.png, grad_norm.png, throughput.png, memory.png" in out
    assert not (flow / "plots" / "logit_gap.png").exists() and (apt / "plots" / "logit_gap.png").is_file()
    assert tool.main([str(flow / "metrics.jsonl"), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "losses.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing"], "missing does not exist (give a run folder or a metrics.jsonl)"),
    (["{tmp}/empty"], "metrics.jsonl holds no finite value to plot"),
    (["{tmp}/empty", "{tmp}/empty", "--out", "{tmp}/x"], "--out takes one run"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float("nan")}) + "\n")
    assert tool.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    a, b = _apt_run(tmp_path / "a"), _apt_run(tmp_path / "b", nan_step=0)
    out = tool.main(["--compare", str(tmp_path / "cmp.png"), f"aR1={a}", f"no aR1={b}"])
    assert out == 0 and capsys.readouterr().out.strip().endswith("cmp.png")
    with Image.open(tmp_path / "cmp.png") as im:
        assert im.size == (1440, 320)  # four panels: D loss, G loss, logit gap, aR1
        assert len(set(im.convert("L").getdata())) > 20
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert tool.main(["--compare", str(tmp_path / "x.png"), f"f={flow}"]) == 2
    assert "none of the runs logged any of d_loss" in capsys.readouterr().err
    assert tool.main(["--compare", str(tmp_path / "x.png"), str(a)]) == 2
    assert "LABEL=RUN_DIR" in capsys.readouterr().err
    assert tool.main(["--compare", str(tmp_path / "x.png"), "--out", str(tmp_path), f"a={a}"]) == 2
    assert "drop --out" in capsys.readouterr().err
