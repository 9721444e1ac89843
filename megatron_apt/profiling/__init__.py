"""The throughput profiler's library (the paper's Table 7 and the training step of each stage):
shapes (`shapes`), timing and memory (`timing`), random-weight models (`builders`), one-step generation
(`inference`) and training steps through the project's own methods (`train`). `tools/profile_throughput.py`
is its command line."""
