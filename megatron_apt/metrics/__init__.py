"""Evaluation: toy-task metrics (digit classifier features, text and motion alignment, sharpness), FID,
patch-FID and CLIP score from local networks, and the Markdown report. (FLOP counts and MFU are in
`megatron_apt.models.flops`.)"""
