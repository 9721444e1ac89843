#!/usr/bin/env python
"""Checkpoint conversions (import/export diffusers, consolidate, reshard, make-apt-init, export-generator). The
code lives in megatron_apt/cli/convert_checkpoint.py; `pip install -e .` also installs it as the console
script `megatron-apt-convert`. `python tools/convert_checkpoint.py --help` lists the options.
"""

import sys

from megatron_apt.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
