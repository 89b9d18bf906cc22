#!/usr/bin/env bash
# Create .venv in the repository root and install the project with its test extra.
# On a CUDA machine the torch already installed for the system Python is kept (the venv sees
# system site-packages); on a CPU machine torch 2.14.1 + torchvision 0.29.1 are installed,
# the pair whose torchvision imports (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$PYTHON" -m venv --system-site-packages .venv
else
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/python -m pip install -q -e '.[test]'
