#!/usr/bin/env bash
# Trains the baselines of `emphysema-uad evaluate` from scratch, on the default model's
# healthy phantoms plus the real thorax CT, with the recipe of the first bundled model (the
# start of the default model's fine-tune; 1600 steps): the reconstruction-only autoencoder and
# the published network's variants without SCRB, without the gate, and with detached fusion.
# Usage: scripts/train_baselines.sh [WORK_DIR] [NAME ...]   (default: output/default-model,
# every baseline of EmphysemaUADLib/variants.py). Each lands in WORK_DIR/baselines/NAME/best.pt;
# rerunning continues interrupted runs. The script ends by printing the evaluate command that uses them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cli="$venv/bin/emphysema-uad"
work="${1:-$root/output/default-model}"
shift || true
names=("$@")
declare -A flag=()  # name -> train flag, from the one table (EmphysemaUADLib/variants.py)
while read -r name option; do
    flag[$name]=$option
    [ $# -gt 0 ] || names+=("$name")
done < <("$venv/bin/python" -m EmphysemaUADLib.variants)

for name in "${names[@]}"; do
    [ -n "${flag[$name]:-}" ] || { echo "error: unknown baseline $name" >&2; exit 2; }
done
source "$root/scripts/make_training_phantoms.sh"
real="${REAL_CT:-$root/../shared/data/chest-ct-dicom}"
data=("$work/phantoms")
if [ -d "$real" ]; then
    data+=("$real")
else
    echo "note: $real not found; training on phantoms only" >&2
fi
settings=(--width 16 --epochs 16 --steps-per-epoch 100 --batch-size 16 --patch-size 144
          --lr 1e-3 --anomaly-loss bce --val-slices 64 --seed 0)
models=()
for name in "${names[@]}"; do
    out="$work/baselines/$name"
    resume=()
    [ -f "$out/last.pt" ] && resume=(--resume)
    "$cli" train "${data[@]}" --output "$out" --cache-dir "$work/run/cache" "${settings[@]}" \
        "${flag[$name]}" "${resume[@]}"
    models+=(--baseline-model "$name=$out/best.pt")
done
echo "evaluate with: $cli evaluate -o output/evaluation ${models[*]}"
