#!/usr/bin/env python
"""Generate videos (or images) from prompts with a one-step APT generator, or a diffusion baseline. The code
lives in megatron_apt/cli/generate.py; `pip install -e .` also installs it as the console script
`megatron-apt-generate`. `python tools/generate.py --help` lists the options.
"""

import sys

from megatron_apt.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
