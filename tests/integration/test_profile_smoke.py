"""tools/profile_throughput.py --smoke end to end on a CPU: every JSON field is present, and numbers are
positive and finite where they must be; plus the clear errors for shapes the VAE and patching cannot take."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "profile_throughput.py"


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MEGATRON_APT_LOGLEVEL="WARNING")
    env.pop("WORLD_SIZE", None)
    return env


def run_tool(*argv, timeout=120, launcher=None):
    cmd = (launcher or [sys.executable, str(TOOL)]) + [str(a) for a in argv]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return p


def load(p, path):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    def strict(const):  # NaN / Infinity are not JSON: the tool writes null instead
        raise AssertionError(f"{path} holds {const}")

    return json.loads(Path(path).read_text(), parse_constant=strict)


def positive(d, *keys):
    for k in keys:
        assert k in d, f"missing field {k!r} in {sorted(d)}"
        v = d[k]
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{k} = {v!r} is not a number"
        assert math.isfinite(v) and v > 0, f"{k} = {v!r} is not a positive finite number"


def times(d, n):
    assert len(d["seconds_all"]) == n and all(t > 0 for t in d["seconds_all"])
    assert d["seconds_min"] <= d["seconds"]


def test_inference_smoke(tmp_path):
    out = tmp_path / "inf.json"
    res = load(run_tool("--smoke", "--mode", "inference", "--json", out), out)
    assert res["mode"] == "inference"
    cfg = res["config"]
    assert cfg["latent"] == [4, 2, 4, 4] and cfg["n_visual_tokens"] == 8 and cfg["frames"] == 5
    assert cfg["resolution"] == [32, 32] and cfg["vae_tiling"] == "both" and cfg["sp"] == 1
    for key in ("preset", "model", "batch", "text_len", "dtype", "attn_backend", "compile", "components",
                "warmup", "iters", "text_encoder_shape", "vae_shape", "vae_dtype"):
        assert key in cfg, key
    te = res["text_encoder"]
    positive(te, "seconds", "seconds_min", "params", "flops", "tflops_per_s", "peak_mem_gib")
    times(te, cfg["iters"])
    dit = res["dit"]
    positive(dit, "seconds", "seconds_min", "params", "flops", "tflops_per_s", "tflops_per_s_per_gpu",
             "mfu_datasheet", "mfu_measured", "peak_tflops_datasheet", "peak_tflops_measured", "peak_mem_gib")
    times(dit, cfg["iters"])
    assert dit["peak_tflops_measured"] == 800 and dit["peak_tflops_datasheet"] == 989
    assert dit["peak_source"].startswith("assumed")  # a CPU is no H100/H200
    bd = dit["flops_breakdown"]
    positive(bd, "embed", "blocks_linear", "attention", "head", "total")
    assert bd["total"] == dit["flops"]
    for key in ("vae", "vae_tiled"):
        v = res[key]
        positive(v, "seconds", "seconds_min", "params", "peak_mem_gib", "flops", "tflops_per_s")
        assert v["tflops_per_s"] == pytest.approx(v["flops"] / v["seconds"] / 1e12)
        assert "max_abs_diff_vs_plain" not in v and "graphs_compiled" not in v  # nothing sped up
        times(v, cfg["iters"])
        assert v["output_shape"] == [1, 3, 5, 32, 32]
    assert res["vae"]["tiling"] is False and res["vae_tiled"]["tiling"] is True
    positive(res, "total_s", "peak_mem_gib", "wall_s")
    assert res["total_s"] == pytest.approx(te["seconds"] + dit["seconds"] + res["vae"]["seconds"])
    assert res["paper_table7_h100"]["1"]["total"] == 6.03
    assert res["mem_source"] and res["env"]["device"] == "cpu" and res["env"]["smoke"] is True
    assert "sp" not in res


def check_kernels(k, n, family):
    """A kernel_breakdown: the families partition the busy time, the top list is the n longest in order."""
    positive(k, "wall_s", "busy_s")
    assert sum(k["families_s"].values()) == pytest.approx(k["busy_s"], rel=1e-9)
    assert k["families_s"].get(family, 0) > 0, k["families_s"]
    assert len(k["top"]) == n and [e["seconds"] for e in k["top"]] == sorted((e["seconds"] for e in k["top"]),
                                                                             reverse=True)


def test_inference_vae_speedups_and_kernels_smoke(tmp_path):
    """--vae-channels-last in bf16: the decode is compared with the plain decoder and with an fp32 one, and
    stays within the plain bf16 decoder's own distance from fp32 (twice it, for the tiny random model);
    --kernels profiles one DiT forward (matmuls) and one decode (convolutions)."""
    out = tmp_path / "vae.json"
    res = load(run_tool("--smoke", "--mode", "inference", "--components", "dit,vae", "--vae-tiling", "off",
                        "--dtype", "bf16", "--vae-channels-last", "--cudnn-benchmark", "--kernels", "4",
                        "--json", out), out)
    cfg = res["config"]
    assert cfg["vae_channels_last"] is True and cfg["vae_compile"] is False and cfg["cudnn_benchmark"] is True
    v = res["vae"]
    positive(v, "flops", "max_abs_diff_vs_fp32", "plain_max_abs_diff_vs_fp32", "peak_mem_warmup_gib")
    assert v["max_abs_diff_vs_plain"] <= 2 * v["plain_max_abs_diff_vs_fp32"]
    assert v["max_abs_diff_vs_fp32"] <= 2 * v["plain_max_abs_diff_vs_fp32"]
    assert "graphs_compiled" not in v  # not compiled
    assert "vae_tiled" not in res
    check_kernels(res["dit"]["kernels"], 4, "matmul")
    check_kernels(v["kernels"], 4, "convolution")


STEP_FIELDS = ("step_time_s", "step_time_min_s", "samples_per_s", "flops_per_step", "hardware_flops_per_step",
               "model_tflops_per_s", "hardware_tflops_per_s", "mfu_datasheet", "mfu_measured",
               "peak_tflops_datasheet", "peak_tflops_measured", "peak_mem_gib")


def check_stage(r, stage, iters=1):
    assert r["stage"] == stage
    positive(r, *STEP_FIELDS)
    assert len(r["step_times_s"]) == iters
    assert r["samples_per_s"] == pytest.approx(r["config"]["micro_batch"] / r["step_time_s"])
    positive(r["flops"], "model", "hardware", "recompute", "forward_equivalents")
    assert r["flops"]["model"] == r["flops_per_step"] == sum(r["flops"]["parts"].values())
    assert r["hardware_flops_per_step"] > r["flops_per_step"]  # activation checkpointing recomputes
    assert r["params"] and all(v > 0 for v in r["params"].values())
    assert r["losses"] and r["losses_finite"] is True
    assert r["precision"].startswith("bf16 autocast") and r["optimizer"]
    c = r["config"]
    assert c["activation_checkpointing"] is True and c["checkpoint_scope"] == "block"
    assert c["latent"] == [4, 2, 4, 4] and c["n_visual_tokens"] == 8
    assert "resident_after_build_gib" in r  # null off-GPU


def test_train_apt_smoke(tmp_path):
    out = tmp_path / "apt.json"
    res = load(run_tool("--smoke", "--mode", "train", "--stage", "apt", "--kernels", "5", "--json", out), out)
    assert res["mode"] == "train" and list(res["stages"]) == ["apt"]
    r = res["stages"]["apt"]
    check_stage(r, "apt")
    # --kernels: one more step under torch.profiler; the families partition the busy time, the top list is
    # the longest kernels in order, and a step does matrix products
    check_kernels(r["kernels"], 5, "matmul")
    assert "RMSprop(alpha=0.9)" in r["optimizer"]
    assert set(r["losses"]) == {"d_loss", "ar1", "g_loss"}
    assert 14 < r["flops"]["forward_equivalents"] < 18  # 4 F_G + 11 F_D, plus the frozen-D attention backward
    positive(res, "wall_s")


def test_train_flow_and_cd_smoke(tmp_path):
    out = tmp_path / "fc.json"
    res = load(run_tool("--smoke", "--mode", "train", "--stage", "flow,cd", "--json", out), out)
    assert list(res["stages"]) == ["flow", "cd"]
    check_stage(res["stages"]["flow"], "flow")
    check_stage(res["stages"]["cd"], "cd")
    assert res["stages"]["flow"]["flops"]["forward_equivalents"] == pytest.approx(3.0, rel=0.03)
    assert res["stages"]["cd"]["flops"]["forward_equivalents"] == pytest.approx(6.0, rel=0.03)


def test_sequence_parallel_smoke(tmp_path):
    """Two gloo ranks (started as torchrun would: RANK / WORLD_SIZE / MASTER_* variables): the DiT is timed
    on rank 0 alone, then Ulysses-parallel on both."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "sp.json"
    argv = [sys.executable, str(TOOL), "--smoke", "--mode", "inference", "--components", "dit", "--sp", "2",
            "--json", str(out)]
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exit {p.returncode}:\n{text[-3000:]}"
    res = load(subprocess.CompletedProcess(argv, 0), out)
    sp = res["sp"]
    assert sp["size"] == 2 and sp["baseline_source"].startswith("measured")
    positive(sp, "dit_seconds", "baseline_dit_seconds", "speedup", "scaling_efficiency")
    assert sp["scaling_efficiency"] == pytest.approx(sp["baseline_dit_seconds"] / (2 * sp["dit_seconds"]))
    positive(res["dit"], "seconds", "tflops_per_s_per_gpu", "peak_mem_gib_max_rank")
    assert res["dit"]["tflops_per_s_per_gpu"] == pytest.approx(res["dit"]["tflops_per_s"] / 2)
    assert res["total_s"] == res["dit"]["seconds"]


def _tool_module():
    from megatron_apt.cli import profile_throughput

    return profile_throughput


def test_training_steps_run_the_projects_methods(tmp_path):
    """The profiler times the method the trainer runs (not a copy of its losses)."""
    out = tmp_path / "m.json"
    res = load(run_tool("--smoke", "--mode", "train", "--stage", "all", "--json", out), out)
    assert {s: r["config"]["method"] for s, r in res["stages"].items()} == {
        "apt": "AdversarialPostTraining", "flow": "FlowMatching", "cd": "ConsistencyDistillation"}


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "1279x720"], "not divisible by the VAE x patch factors"),
    (["--resolution", "1280x712"], "nearest valid: 1280x720"),
    (["--frames", "48"], "frames do not fit the VAE's causal temporal factor 4"),
    (["--latent", "16x13x91x160"], "not divisible by the patch size"),
    (["--latent", "4x13x90x160"], "expects 16"),
    (["--resolution", "wide"], "WIDTHxHEIGHT"),
])
def test_bad_shapes_fail_clearly(argv, message, capsys):
    # in-process: the shape check runs before anything is built or any heavy import
    rc = _tool_module().main(["--mode", "inference", "--preset", "8b", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and message in err


def test_video_to_latent_paper_shape():
    from megatron_apt.config.model import get_model_config

    from megatron_apt.profiling import shapes as mod_shapes

    mod = _tool_module()
    cfg = get_model_config("8b")
    assert mod_shapes.video_to_latent(1280, 720, 49, 16, cfg.patch_size) == (16, 13, 90, 160)  # 46,800 tokens
    args = mod.build_parser().parse_args(["--mode", "train", "--stage", "all"])
    mod.apply_defaults(args)
    assert args.preset == "2b" and args.stages == ["apt", "flow", "cd"] and args.text_len == 512
    shapes = mod_shapes.resolve_shapes(args, get_model_config(args.preset))
    assert shapes["latent"] == [16, 13, 90, 160] and shapes["n_visual_tokens"] == 46800 and shapes["frames"] == 49


def test_compiled_apt_step_stays_compiled(tmp_path):
    """An APT step runs each block in several configurations (grad / no grad, D trainable / frozen, the fused
    D batch, the last block); each must compile once, within the recompile limit, so that no block falls back
    to eager and nothing recompiles once the step has run."""
    out = tmp_path / "compiled.json"
    res = load(run_tool("--smoke", "--mode", "train", "--stage", "apt", "--compile", "--warmup", "1", "--iters", "2",
                        "--dtype", "fp32", "--json", out, timeout=900), out)
    r = res["stages"]["apt"]
    assert r["config"]["compile"] is True
    assert r["recompile_limit_hit"] is False
    assert r["graphs_compiled_while_timed"] == 0
