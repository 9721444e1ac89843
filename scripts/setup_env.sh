#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs the pinned requirements and the package
# (editable, with its console scripts: megatron-apt-train, -generate, ...).
# Sourced by examples/quickstart.sh and tests/run.sh, so each of them works on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_APT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.requirements.sha"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (first run takes a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$ROOT/requirements-dev.txt"
  python -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
# DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU one.
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
