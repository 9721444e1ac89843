"""Parallelism, applied from outside the model: process groups, tensor parallel (megatron-core), Ulysses
sequence parallel, activation checkpointing."""

from megatron_apt.parallel.parallelize import apply_activation_checkpointing, parallelize_mmdit
from megatron_apt.parallel.state import (
    ParallelDims,
    current_dims,
    destroy_model_parallel,
    init_distributed,
    initialize_model_parallel,
)

__all__ = [
    "ParallelDims",
    "apply_activation_checkpointing",
    "current_dims",
    "destroy_model_parallel",
    "init_distributed",
    "initialize_model_parallel",
    "parallelize_mmdit",
]
