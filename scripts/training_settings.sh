# Sourced by train_default_model.sh and train_baselines.sh (with $root and $work set): one
# definition of the training data and settings, so that the baselines of `emphysema-uad
# evaluate` train exactly as the default model does.
real="${REAL_CT:-$root/../shared/data/chest-ct-dicom}"
data=("$work/phantoms")
if [ -d "$real" ]; then
    data+=("$real")
else
    echo "note: $real not found; training on phantoms only" >&2
fi
settings=(--width 16 --epochs 16 --steps-per-epoch 100 --batch-size 16 --patch-size 144
          --lr 1e-3 --anomaly-loss bce --val-slices 64 --seed 0)
