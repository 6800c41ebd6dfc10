#!/usr/bin/env bash
# Trains the bundled default model and writes it, with its model card, to Resources/Models.
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default: output/default-model).
# Rerunning continues an interrupted run (--resume).
#
# Two stages. The start is the first bundled model, taken from this repository's history
# (commit a240474): trained from scratch by the earlier version of this script (phantoms plus
# the real CT of ../shared/data, 1600 steps of 144-pixel patches, air-density lesions).
# Stage two fine-tunes it with tissue-loss lesions (lesions.py) on the healthy phantoms of
# every noise level and kernel in two geometries plus the real CTs of ../shared/data (the
# thorax CT, and one scan of another scanner in a standard and a sharp kernel): 400 steps of
# 8 patches of 256 pixels (wide patches rank real emphysema better than 144-pixel ones, in
# every one of eight seeds; README, "Real emphysema"). Width 16: detect handles a full thorax
# CT within a minute on 2 cores.
# Where ../shared/data holds them, the model card reports `validate` on the labelled HRCT
# slices as stored and with their HU scale corrected, and on its labelled ROIs (labels
# measure only; they never train or tune anything) and `detect` on the healthy scans.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cli="$venv/bin/emphysema-uad"
work="${1:-$root/output/default-model}"
shared="$root/../shared/data"
start_commit=a240474

source "$root/scripts/make_training_phantoms.sh"
data=("$work/phantoms")
for real in "$shared/chest-ct-dicom" "$shared/lung-pet-ct-dx"; do
    if [ -e "$real" ]; then data+=("$real"); else echo "note: $real not found" >&2; fi
done
if [ ! -f "$work/start.pt" ]; then
    git -C "$root" show "$start_commit:Resources/Models/edlnet_default.pt" > "$work/start.pt.tmp"
    mv "$work/start.pt.tmp" "$work/start.pt"
fi
settings=(--init-from "$work/start.pt" --width 16 --epochs 4 --steps-per-epoch 100
          --batch-size 8 --patch-size 256 --lr 3e-4 --anomaly-loss bce --val-slices 64 --seed 0)
resume=()
[ -f "$work/finetune/last.pt" ] && resume=(--resume)
"$cli" train "${data[@]}" --output "$work/finetune" "${settings[@]}" "${resume[@]}"

measured=()
labels="$shared/emphysema-hrct-slices/labels.csv"
if [ -f "$labels" ]; then
    "$cli" validate "$labels" --model "$work/finetune/best.pt" -o "$work/validate"
    # and with the slices' shifted HU scale kept as stored (README, "HU scale")
    "$cli" validate "$labels" --model "$work/finetune/best.pt" --no-correct-hu \
        -o "$work/validate-stored"
    measured+=(--validation "$work/validate/report.json"
               --validation "$work/validate-stored/report.json")
    # and the labelled ROIs of the same database (README, "ROIs of parenchyma")
    "$cli" validate "${labels%/*}/patch_labels.csv" --model "$work/finetune/best.pt" \
        -o "$work/validate-patches"
    measured+=(--validation "$work/validate-patches/report.json")
fi
if [ ${#data[@]} -gt 1 ]; then  # the real CTs, healthy
    rm -rf "$work/healthy"
    "$cli" detect "${data[@]:1}" --model "$work/finetune/best.pt" -o "$work/healthy"
    measured+=(--healthy-scans "$work/healthy")
fi
"$venv/bin/python" "$root/scripts/export_default_model.py" "$work/finetune/best.pt" \
    --output "$root/Resources/Models" "${measured[@]}" \
    --command "scripts/train_default_model.sh (stage 2, start.pt = the first bundled model \
of commit $start_commit: emphysema-uad train ${settings[*]/#$work\//})"
