#!/usr/bin/env bash
# Create .venv in the repository and install EMamba with its test tools.
# Torch is pinned to the release that this project's machines carry on local disk (a CUDA build that
# also runs on CPU); set EMAMBA_TORCH_SPEC to install another one, e.g. EMAMBA_TORCH_SPEC="torch torchvision".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${EMAMBA_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    .venv/bin/pip install --quiet $TORCH_SPEC
fi
echo "[setup] installing emamba (editable) with the dev extra"
.venv/bin/pip install --quiet -e ".[dev]"
echo "[setup] building the fused CPU scan kernel (first use compiles it, later uses load the cache)"
.venv/bin/python -c "import emamba.ops as ops; print('[setup] scan backends available:', ', '.join(ops.available_backends()))"
