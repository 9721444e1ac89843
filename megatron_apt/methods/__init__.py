"""Training methods: flow matching, consistency distillation, adversarial post-training."""
