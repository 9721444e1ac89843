#!/usr/bin/env python
"""Entry point for every training stage (flow matching, consistency distillation, APT image and video). The code
lives in megatron_apt/cli/train.py; `pip install -e .` also installs it as the console script
`megatron-apt-train`. `python pretrain_apt.py --help` lists the options.
"""

import sys

from megatron_apt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
