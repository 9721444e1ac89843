"""Models: the MMDiT backbone, the APT generator and discriminator, their FLOP counts, text encoders and VAEs.
(Model directories on disk are read and written by `megatron_apt.checkpoint.model_dir`.)"""

from megatron_apt.models.build import build_mmdit
from megatron_apt.models.discriminator import CrossAttentionHead, Discriminator, OneStepGenerator
from megatron_apt.models.mmdit import MMDiT, count_parameters

__all__ = ["CrossAttentionHead", "Discriminator", "MMDiT", "OneStepGenerator", "build_mmdit", "count_parameters"]
