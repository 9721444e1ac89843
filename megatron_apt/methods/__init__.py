"""Training methods: flow matching (the base model), consistency distillation (§3.2) and adversarial
post-training (§3.3-3.5), each written once for every engine and parallel layout."""

from megatron_apt.methods.adversarial import AdversarialPostTraining
from megatron_apt.methods.base import Method, MethodContext
from megatron_apt.methods.consistency import ConsistencyDistillation
from megatron_apt.methods.flow import FlowMatching

METHODS = {"flow": FlowMatching, "cd": ConsistencyDistillation, "apt_image": AdversarialPostTraining,
           "apt_video": AdversarialPostTraining}

__all__ = ["METHODS", "AdversarialPostTraining", "ConsistencyDistillation", "FlowMatching", "Method",
           "MethodContext"]
