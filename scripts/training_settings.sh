# Sourced by train_default_model.sh and train_baselines.sh (with $root, $work and $cli set):
# the training data (the phantoms of make_training_phantoms.sh, plus the real CT when present)
# and settings, so that the baselines of `emphysema-uad evaluate` train exactly as the default
# model does.
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
