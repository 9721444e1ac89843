#!/usr/bin/env python
"""Write the moving-digits toy data set (mp4 + caption .txt files, or PNG images with --images).

    python tools/make_toy_dataset.py --output data/toy --num 512 --seed 0
    python tools/make_toy_dataset.py --output data/toy_images --images

See megatron_apt/data/toy.py for what the videos and captions look like.
"""

import sys

if __name__ == "__main__":
    from megatron_apt.cli.make_toy_dataset import main

    sys.exit(main())
