"""Console script `megatron-apt-toy-data` (= tools/make_toy_dataset.py): the moving-digits toy data set of
megatron_apt/data/toy.py."""

from __future__ import annotations


def main(argv=None) -> int:
    from megatron_apt.data.toy import main as run

    return run(argv)
