# Sourced by training_settings.sh (with $work and $cli set): makes the 16 healthy training
# phantoms in $work/phantoms once (every noise level and kernel, in two geometries).
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
