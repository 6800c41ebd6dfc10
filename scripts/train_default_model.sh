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

source "$root/scripts/training_settings.sh"  # phantoms, data and settings, shared with the baselines
resume=()
[ -f "$work/run/last.pt" ] && resume=(--resume)
"$cli" train "${data[@]}" --output "$work/run" "${settings[@]}" "${resume[@]}"
"$venv/bin/python" "$root/scripts/export_default_model.py" "$work/run/best.pt" \
    --output "$root/Resources/Models" \
    --command "scripts/train_default_model.sh (emphysema-uad train ${settings[*]})"
