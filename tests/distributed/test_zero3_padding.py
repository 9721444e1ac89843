"""ZeRO-3 pads the last rank's partition of a parameter that the ranks do not divide, and leaves the padding
uninitialised (it may hold NaN or inf from whatever the memory held before). The engine's finiteness check,
which stops a diverged run before it writes a checkpoint, looks at the parameters' elements only: garbage in
the padding is no divergence, a NaN in a parameter is (2 gloo ranks, data parallel 2)."""

import pytest
import torch

from tests.helpers.ranks import run_distributed


def _worker(rank, world):
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel
    from megatron_apt.trainer.engines import DeepSpeedEngine

    initialize_model_parallel(ParallelDims.from_world(world))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))  # 15 + 5 + 5 + 1 elements: odd
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    eng = DeepSpeedEngine(model, opt, grad_clip=0.0, precision="fp32", zero_stage=3, micro_batch=2,
                          persistence_threshold=0)
    eng.init_ema()
    zopt = eng.engine.optimizer
    pads = [pad for group in zopt.groups_padding for pad in group]
    masks = eng._parameter_elements()
    flat = zopt.fp32_partitioned_groups_flat
    checks = {"pads": sum(pads), "padding_elements": sum(int((~m).sum()) for m in masks)}
    with torch.no_grad():
        for t, m in list(zip(flat, masks)) + list(zip(eng.ema, masks)):  # as uninitialised memory may leave it
            t[~m] = float("nan")
        checks["finite_with_nan_padding"] = eng.weights_finite()
        flat[0][masks[0].nonzero()[0]] = float("inf")  # one parameter element
        checks["finite_with_inf_parameter"] = eng.weights_finite()
    return checks


@pytest.mark.distributed
def test_nan_in_zero3_padding_is_no_divergence_but_a_parameter_is():
    first, last = run_distributed(_worker, 2, timeout=300)
    assert first["pads"] == 0 and last["pads"] > 0  # only the last rank pads: 15, 5, 5 and 1 are odd
    assert last["padding_elements"] == last["pads"]
    for r in (first, last):
        assert r["finite_with_nan_padding"] is True
        assert r["finite_with_inf_parameter"] is False
