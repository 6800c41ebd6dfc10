#!/usr/bin/env bash
# Measures adapting the model to a site's own healthy scans without letting a subject be on
# both sides: the subjects of a labelled cohort (a `validate` CSV) are split in two folds; the
# model is adapted on the normal images of one fold and scores every image of the other;
# `validate --results` then reports all images, each scored by a model that never saw its
# subject. Two ways to adapt:
#   threshold  `site-threshold`: the voxel threshold from the fold's normal images (seconds)
#   fine-tune  `train --init-from`: the network fine-tuned on them (minutes)
# Usage:
#   scripts/site_adaptation.sh threshold|fine-tune LABELS.csv [MODEL] [WORK_DIR]
# (MODEL default: the bundled model; WORK_DIR default: output/site-adaptation/<method>).
set -euo pipefail
method="${1:-}"
case "$method" in
    threshold|fine-tune) ;;
    *) echo "usage: $0 threshold|fine-tune LABELS.csv [MODEL] [WORK_DIR]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cli="$venv/bin/emphysema-uad"
labels="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
model="${3:-bundled}"
work="${4:-$root/output/site-adaptation/$method}"
mkdir -p "$work"

# folds: subjects in natural order (subject2 before subject10), alternating
"$venv/bin/python" - "$labels" "$work" <<'PY'
import csv, re, sys
from pathlib import Path
labels, work = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader(labels.open(newline="")))
key = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
fold = {s: i % 2 for i, s in enumerate(sorted({r["subject"] for r in rows}, key=key))}
for k in (0, 1):
    normals = work / f"fold{k}_normals"
    normals.mkdir(exist_ok=True)
    with (work / f"fold{k}_images.txt").open("w") as images:
        for r in rows:
            if fold[r["subject"]] != k:
                continue
            image = (labels.parent / r["file"]).resolve()
            images.write(f"{image}\n")
            link = normals / image.name
            if r.get("pattern", "").lower() == "normal" and not link.exists():
                link.symlink_to(image)
PY

model_flag=()
[ "$model" = bundled ] || model_flag=(--model "$model")
for k in 0 1; do
    other=$((1 - k))
    run="$work/adapted_on_fold$k"
    if [ "$method" = threshold ]; then
        adapted="$run/site_model.pt"
        [ -f "$adapted" ] || "$cli" site-threshold "$work/fold${k}_normals" -o "$adapted" \
            "${model_flag[@]}" --progress none
    else
        adapted="$run/last.pt"
        [ -f "$adapted" ] || "$cli" train "$work/fold${k}_normals" --output "$run" \
            --init-from "$model" --epochs 1 --steps-per-epoch 60 --batch-size 16 \
            --patch-size 144 --lr 2e-4 --anomaly-loss bce --val-slices 32 --seed $((k + 1))
    fi
    mapfile -t images < "$work/fold${other}_images.txt"
    "$cli" detect "${images[@]}" --model "$adapted" -o "$work/detect" --progress none
done
"$cli" validate "$labels" --results "$work/detect" -o "$work/validate"
