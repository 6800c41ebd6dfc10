#!/usr/bin/env bash
# Measures fine-tuning the model on a site's own healthy scans without letting a subject be
# on both sides. The subjects of a labelled cohort (a `validate` CSV) are split into the two
# folds `validate --site-folds 2` uses; the network is fine-tuned (`train --init-from`, what
# the Training tab's "start from the bundled model" does) on the normal images of one fold
# and scores every image of the other; `validate --results` then reports all images, each
# scored by a model that never saw its subject. (Adapting the threshold alone needs no
# script: `emphysema-uad validate LABELS.csv --site-folds 2`.)
# Usage:
#   scripts/site_fine_tune.sh LABELS.csv [MODEL] [WORK_DIR]
# (MODEL default: the bundled model; WORK_DIR default: output/site-fine-tune).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 LABELS.csv [MODEL] [WORK_DIR]" >&2; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cli="$venv/bin/emphysema-uad"
labels="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
model="${2:-bundled}"
work="${3:-$root/output/site-fine-tune}"
mkdir -p "$work"

# the folds of `validate --site-folds 2`: each fold's images, and links to its normal ones
"$venv/bin/python" - "$labels" "$work" <<'PY'
import sys
from pathlib import Path
from EmphysemaUADLib.validation import read_labels, subject_folds
labels, work = read_labels(sys.argv[1]), Path(sys.argv[2])
fold = subject_folds(labels.subjects, 2)
for k in (0, 1):
    normals = work / f"fold{k}_normals"
    normals.mkdir(exist_ok=True)
    cases = [c for c in labels.cases if fold[c.subject] == k]
    (work / f"fold{k}_images.txt").write_text("".join(f"{c.file.resolve()}\n" for c in cases))
    for c in cases:
        link = normals / c.file.name
        if not c.emphysema and not link.exists():
            link.symlink_to(c.file.resolve())
PY

for k in 0 1; do
    run="$work/adapted_on_fold$k"
    [ -f "$run/last.pt" ] || "$cli" train "$work/fold${k}_normals" --output "$run" \
        --init-from "$model" --epochs 1 --steps-per-epoch 60 --batch-size 16 \
        --patch-size 144 --lr 2e-4 --anomaly-loss bce --val-slices 32 --seed $((k + 1))
    mapfile -t images < "$work/fold$((1 - k))_images.txt"
    "$cli" detect "${images[@]}" --model "$run/last.pt" -o "$work/detect" --progress none
done
"$cli" validate "$labels" --results "$work/detect" -o "$work/validate"
