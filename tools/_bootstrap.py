"""Lets `python tools/<tool>.py` import megatron_apt from a source checkout that was not pip-installed."""

import sys
from pathlib import Path

root = str(Path(__file__).resolve().parent.parent)
if root not in sys.path:
    sys.path.insert(0, root)
