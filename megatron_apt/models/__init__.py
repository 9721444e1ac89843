"""Models: the MMDiT backbone, the APT generator and discriminator, checkpoint-directory loading."""

from megatron_apt.models.discriminator import CrossAttentionHead, Discriminator, OneStepGenerator
from megatron_apt.models.io import build_mmdit, load_mmdit, save_mmdit
from megatron_apt.models.mmdit import MMDiT, count_parameters

__all__ = ["CrossAttentionHead", "Discriminator", "MMDiT", "OneStepGenerator", "build_mmdit", "count_parameters",
           "load_mmdit", "save_mmdit"]
