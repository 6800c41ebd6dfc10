# Sourced by train_default_model.sh and train_baselines.sh (with $root, $work and $cli set):
# makes the healthy phantoms once and defines the training data and settings, so that the
# baselines of `emphysema-uad evaluate` train exactly as the default model does.
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

real="${REAL_CT:-$root/../shared/data/chest-ct-dicom}"
data=("$work/phantoms")
if [ -d "$real" ]; then
    data+=("$real")
else
    echo "note: $real not found; training on phantoms only" >&2
fi
settings=(--width 16 --epochs 16 --steps-per-epoch 100 --batch-size 16 --patch-size 144
          --lr 1e-3 --anomaly-loss bce --val-slices 64 --seed 0)
