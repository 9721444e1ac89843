#!/usr/bin/env python
"""Preprocess videos/images (+ captions) into Megatron indexed data sets for training.

Examples::

    # pixels + byte-level token ids (no models needed), one process
    python tools/preprocess_video.py --input data/toy --output data/toy_pix/train \\
        --resolution 32x32 --fps 8 --frames 16

    # Wan VAE latents + UMT5 hidden states on 8 GPUs, then merge the shards and check the result
    torchrun --nproc-per-node 8 tools/preprocess_video.py --input videos.csv --output out/train \\
        --resolution 1280x720 --fps 24 --frames 49 --vae ckpt/Wan2.1/vae \\
        --text-encoder ckpt/Wan2.1/text_encoder --merge --verify

    # stand-alone steps
    python tools/preprocess_video.py --output out/train --merge
    python tools/preprocess_video.py --output out/train --verify

A killed run resumes where it stopped when started again with the same arguments. See
megatron_apt/data/preprocess.py for the pipeline and megatron_apt/data/indexed.py for the format.
"""

import sys

if __name__ == "__main__":
    # imported here, not at the top: decode workers re-import this file and must stay light
    from megatron_apt.cli.preprocess_video import main

    sys.exit(main())
