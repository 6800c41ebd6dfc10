#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv beside this script's project and installs
# EmphysemaUAD into it. Needs only python3 (3.10-3.12) with venv and pip.
# torch: a CPU build (torch==2.13.0) is installed only where the environment has no torch;
# to use a GPU, install a CUDA build of torch into .venv first (see README, "GPU").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EMPHYSEMA_UAD_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "Creating the environment in $venv" >&2
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip >&2
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "Installing PyTorch (CPU build ${TORCH_SPEC:-torch==2.13.0})" >&2
    "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" >&2
fi
echo "Installing EmphysemaUAD and its test tools" >&2
"$py" -m pip install --quiet -e "$root[test]" >&2
echo "$venv"
