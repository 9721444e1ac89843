#!/usr/bin/env python
"""Throughput of one-step video generation (the paper's Table 7) and of each stage's training step. The code
lives in megatron_apt/cli/profile_throughput.py; `pip install -e .` also installs it as the console script
`megatron-apt-profile`. `python tools/profile_throughput.py --help` lists the options.
"""

import sys

from megatron_apt.cli.profile_throughput import main

if __name__ == "__main__":
    sys.exit(main())
