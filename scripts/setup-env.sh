#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv beside this script's project and installs
# EmphysemaUAD into it; prints the environment's folder. Needs only python3 (3.10-3.12) with
# venv and pip. pip's output goes to .venv/setup.log and is shown only when a step fails.
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
log="$venv/setup.log"
: > "$log"

pip_install() {  # pip install "$@", quietly; its log on failure
    if ! "$py" -m pip install --quiet "$@" >>"$log" 2>&1; then
        echo "error: 'pip install $*' failed; its output:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

pip_install --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "Installing PyTorch (CPU build ${TORCH_SPEC:-torch==2.13.0})" >&2
    pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "Installing EmphysemaUAD and its test tools" >&2
pip_install -e "$root[test]"
echo "$venv"
