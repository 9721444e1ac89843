"""Metrics: analytic model-FLOP counts, peak throughput figures and MFU."""

from megatron_apt.metrics.flops import (
    H100_SXM_BF16_DENSE,
    MEASURED_H200_BF16,
    StepFlops,
    apt_step_flops,
    consistency_step_flops,
    discriminator_forward_flops,
    flow_matching_step_flops,
    mfu,
    mfu_report,
    mmdit_forward_flops,
    peak_flops,
    t5_encoder_forward_flops,
    visual_tokens,
)

__all__ = [
    "H100_SXM_BF16_DENSE",
    "MEASURED_H200_BF16",
    "StepFlops",
    "apt_step_flops",
    "consistency_step_flops",
    "discriminator_forward_flops",
    "flow_matching_step_flops",
    "mfu",
    "mfu_report",
    "mmdit_forward_flops",
    "peak_flops",
    "t5_encoder_forward_flops",
    "visual_tokens",
]
