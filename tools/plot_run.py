#!/usr/bin/env python
"""PNG plots of a training run's metrics.jsonl (losses, logit gap, aR1, gradient norms, throughput, memory). The
code lives in megatron_apt/cli/plot_run.py; `pip install -e .` also installs it as the console script
`megatron-apt-plot`. `python tools/plot_run.py --help` lists the options.
"""

import sys

from megatron_apt.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
