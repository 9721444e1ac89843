"""Console script `megatron-apt-preprocess` (= tools/preprocess_video.py): the preprocessing job of
megatron_apt/data/preprocess.py. Kept light at import: decode workers (forkserver / spawn) re-import the
main module, so the heavy imports happen inside main()."""

from __future__ import annotations


def main(argv=None) -> int:
    from megatron_apt.data.preprocess import main as run

    return run(argv)
