"""megatron_apt: Adversarial Post-Training (APT) of text-to-video diffusion transformers into one-step generators.

Library layout:
  config/      dataclass configs, the model size registry, YAML loading with dotted overrides
  models/      the MMDiT backbone, the APT discriminator heads, text encoder and VAE loaders
  parallel/    everything distributed: process groups, tensor/sequence parallel, activation checkpointing
  methods/     training methods (flow matching, consistency distillation, APT)
  data/        indexed datasets, samplers, the toy data set
  checkpoint/  checkpoint formats and conversions
  inference/   sampling and video writing
"""

__version__ = "0.1.0"
