#!/usr/bin/env bash
# Trains the bundled default model from scratch and writes it, with its model card, to
# Resources/Models. Usage: scripts/train_default_model.sh [WORK_DIR]   (default:
# output/default-model). Rerunning continues an interrupted run (--resume).
#
# Data: healthy phantoms of every noise level and kernel in two geometries (the phantom's own,
# and a finer one like a clinical thorax CT), plus the real CT of ../shared/data when present
# (REAL_CT overrides its path). Settings are sized for a 2-core CPU: width 16 (detect on a
# full thorax CT within a minute on 2 cores), random 144-pixel patches, 1600 steps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cli="$venv/bin/emphysema-uad"
work="${1:-$root/output/default-model}"

mkdir -p "$work/phantoms"
seed=100
for geometry in "112 224 224:2.5 1.6 1.6" "120 400 400:2.0 0.9 0.9"; do
    shape="${geometry%%:*}"
    spacing="${geometry##*:}"
    for noise in 10 20 35 50; do
        for kernel in smooth sharp; do
            seed=$((seed + 1))
            ct="$work/phantoms/healthy_${seed}_${kernel}_${noise}hu.nii.gz"
            [ -f "$ct" ] || "$cli" phantom --seed "$seed" --emphysema none --kernel "$kernel" \
                --noise "$noise" --shape $shape --spacing $spacing --output "$ct" \
                --png "$work/phantoms/healthy_${seed}.png" >/dev/null
        done
    done
done

source "$root/scripts/training_settings.sh"  # data and settings, shared with the baselines
resume=()
[ -f "$work/run/last.pt" ] && resume=(--resume)
"$cli" train "${data[@]}" --output "$work/run" "${settings[@]}" "${resume[@]}"
"$venv/bin/python" "$root/scripts/export_default_model.py" "$work/run/best.pt" \
    --output "$root/Resources/Models" \
    --command "scripts/train_default_model.sh (emphysema-uad train ${settings[*]})"
