#!/usr/bin/env python
"""Will a training stage fit, and how long will an update take? The code lives in megatron_apt/cli/plan.py; `pip
install -e .` also installs it as the console script `megatron-apt-plan`. `python tools/plan.py --help` lists
the options.
"""

import sys

from megatron_apt.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
