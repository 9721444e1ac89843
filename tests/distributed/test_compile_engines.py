"""torch.compile under the DeepSpeed ZeRO-3 engine (2 gloo ranks, data parallel 2, blocks as ZeRO-3 leaf
modules): each block's forward compiles once per configuration the step uses and nothing recompiles after
the first round; ZeRO-3's gathering hooks stay outside the compiled code. Compiled with dynamo's 'eager'
backend: the guards and recompiles are dynamo's whatever the backend, without inductor's code generation."""

import pytest
import torch

from tests.helpers.ranks import run_distributed


def _worker(rank, world):
    import logging

    from torch._dynamo.utils import counters

    from megatron_apt.models import build_mmdit
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel, parallelize_mmdit
    from megatron_apt.trainer.engines import DeepSpeedEngine

    torch._dynamo.reset()
    counters.clear()
    traced = []  # the frames dynamo traces: "Step 1: torchdynamo start tracing FUNCTION FILE:LINE"

    class Frames(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "start tracing" in msg:
                traced.append(msg.split("start tracing", 1)[1].strip())

    torch._logging.set_logs(dynamo=logging.INFO)
    logging.getLogger("torch._dynamo").addHandler(Frames())
    initialize_model_parallel(ParallelDims.from_world(world))
    model = build_mmdit("debug", zero_init=False, seed=3)
    parallelize_mmdit(model, activation_checkpointing=True, compile="eager")
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    eng = DeepSpeedEngine(model, opt, grad_clip=0.0, precision="fp32", zero_stage=3, micro_batch=2,
                          persistence_threshold=0, leaf_blocks=True)
    g = torch.Generator().manual_seed(rank)
    x, t = torch.randn(2, 4, 1, 8, 8, generator=g), torch.rand(2, generator=g)
    text, mask = torch.randn(2, 5, 24, generator=g), torch.ones(2, 5, dtype=torch.bool)
    graphs = []
    for _ in range(3):  # a round: a forward without grad (G's samples for D's update), then a training step
        with torch.no_grad():
            eng(x, t, text, mask)
        loss = eng(x, t, text, mask).square().mean()
        eng.backward(loss)
        eng.step()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs, traced, float(loss)


@pytest.mark.distributed
def test_compiled_blocks_under_zero3_compile_once_and_keep_its_hooks_out():
    for graphs, traced, loss in run_distributed(_worker, 2, timeout=600):
        assert graphs[0] > 0 and traced, "nothing was compiled"
        assert graphs[2] == graphs[0], f"graphs compiled after the first round: {graphs}"
        assert not [f for f in traced if "deepspeed" in f], traced
        assert torch.isfinite(torch.tensor(loss))
