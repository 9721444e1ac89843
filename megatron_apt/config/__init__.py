"""Configuration: dataclasses with a docstring per field, the size registry, YAML with dotted overrides."""

from megatron_apt.config.model import MODEL_PRESETS, DiscriminatorConfig, MMDiTConfig, get_model_config

__all__ = ["MODEL_PRESETS", "DiscriminatorConfig", "MMDiTConfig", "get_model_config"]
