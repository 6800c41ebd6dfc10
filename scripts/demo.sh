#!/usr/bin/env bash
# Set up the environment, then run the main job on the embedded demo case and say where the
# outputs are. Usage: scripts/demo.sh [OUTPUT_DIR]   (default: output/demo)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
out="${1:-$root/output/demo}"
cli="$venv/bin/emphysema-uad"
# The demo case: a synthetic chest CT with moderate mixed emphysema from a fixed seed
# (no real patient CT may ship inside the project).
"$cli" phantom --seed 7 --emphysema moderate --morphology mixed \
    --output "$out/demo_ct.nii.gz" --truth-dir "$out/truth"
"$cli" lungs "$out/demo_ct.nii.gz" --output "$out/lungs.nii.gz" --png "$out/lungs.png"
echo "Demo outputs are in $out (open lungs.png for the lung segmentation over the CT)."
