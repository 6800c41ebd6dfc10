#!/usr/bin/env bash
# Set up the environment, then run the main job, detection with the bundled model, on the
# embedded demo case and say where the outputs are.
# Usage: scripts/demo.sh [OUTPUT_DIR]   (default: output/demo)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
out="${1:-$root/output/demo}"
cli="$venv/bin/emphysema-uad"
# The demo case: a synthetic chest CT with moderate mixed emphysema from a fixed seed (no real
# patient CT may ship inside the project); its truth goes beside it for comparison.
"$cli" phantom --seed 7 --emphysema moderate --morphology mixed \
    --output "$out/demo_ct.nii.gz" --truth-dir "$out/truth" >/dev/null
"$cli" detect "$out/demo_ct.nii.gz" --output-dir "$out"
case_dir="$out/demo_ct"
echo
echo "Demo outputs are in $out:"
echo "  overlay (open it):   $case_dir/overlay.png"
echo "  report:              $case_dir/report.json"
echo "  label map, anomaly map, regions: $case_dir/{emphysema,anomaly_map,regions}.nii.gz"
echo "  worklist:            $out/summary.csv"
echo "  the demo CT and its truth: $out/demo_ct.nii.gz, $out/truth/"
