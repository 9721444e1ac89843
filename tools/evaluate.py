#!/usr/bin/env python
"""Compare generators on real data: toy metrics, FID / patch FID / CLIP score, a Markdown report. The code lives
in megatron_apt/cli/evaluate.py; `pip install -e .` also installs it as the console script
`megatron-apt-evaluate`. `python tools/evaluate.py --help` lists the options.
"""

import sys

from megatron_apt.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
