# Sourced by train_default_model.sh and train_baselines.sh (with $work and $cli set): makes
# the 16 healthy training phantoms in $work/phantoms once (every noise level and kernel, in
# two geometries).
mkdir -p "$work/phantoms"
phantom_seed=100  # not $seed: the scripts that source this may use that name
for geometry in "112 224 224:2.5 1.6 1.6" "120 400 400:2.0 0.9 0.9"; do
    shape="${geometry%%:*}"
    spacing="${geometry##*:}"
    for noise in 10 20 35 50; do
        for kernel in smooth sharp; do
            phantom_seed=$((phantom_seed + 1))
            ct="$work/phantoms/healthy_${phantom_seed}_${kernel}_${noise}hu.nii.gz"
            [ -f "$ct" ] || "$cli" phantom --seed "$phantom_seed" --emphysema none \
                --kernel "$kernel" --noise "$noise" --shape $shape --spacing $spacing \
                --output "$ct" --png "$work/phantoms/healthy_${phantom_seed}.png" >/dev/null
        done
    done
done
