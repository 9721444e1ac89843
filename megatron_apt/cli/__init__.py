"""Command-line tools. Each module has a `main(argv=None) -> int`; they are installed as console scripts
(see pyproject.toml) and wrapped by the scripts under tools/ and pretrain_apt.py:

  megatron-apt-train      pretrain_apt.py                 every training stage
  megatron-apt-preprocess tools/preprocess_video.py       videos/images + captions -> indexed data sets
  megatron-apt-toy-data   tools/make_toy_dataset.py       the moving-digits toy data set
  megatron-apt-convert    tools/convert_checkpoint.py     checkpoint conversions
  megatron-apt-generate   tools/generate.py               sampling
  megatron-apt-evaluate   tools/evaluate.py               metrics and the evaluation report
  megatron-apt-profile    tools/profile_throughput.py     throughput of inference and training steps
  megatron-apt-plan       tools/plan.py                   memory and time of a layout before booking GPUs
  megatron-apt-plot       tools/plot_run.py               PNG curves of a run's metrics.jsonl
"""
