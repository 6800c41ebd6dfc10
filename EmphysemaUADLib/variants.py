"""The trained baselines: the published network's variants and the reconstruction-only
autoencoder, in one table that the `train` command line (its flags), `evaluate` (labels and
the checkpoint check) and scripts/train_baselines.sh (`python -m EmphysemaUADLib.variants`)
all read.

Each row: name -> train flag -> the `TrainOptions` it sets, and what a checkpoint of it
shows (its model config, or its voxel score).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str  # as `evaluate --baseline-model NAME=PATH` takes it
    label: str  # in evaluate's tables and charts
    flag: str  # of `emphysema-uad train`
    option: str  # the TrainOptions field the flag sets
    value: bool  # ... to this (the default is its negation)
    checkpoint: tuple[str, object]  # (model config key, or "score"; the value it must have)
    help: str


VARIANTS = {v.name: v for v in (
    Variant("autoencoder", "Autoencoder (reconstruction only)", "--reconstruction-only",
            "reconstruction_only", True, ("score", "residual"),
            "no anomaly term: an autoencoder that detects by the residual "
            "|input - reconstruction|"),
    Variant("no-scrb", "EDLNet without SCRB", "--no-scrb", "scrb", False, ("scrb", False),
            "plain double-conv bottleneck instead of the SCRB"),
    Variant("no-gate", "EDLNet without gate", "--no-gate", "gate", False, ("gate", False),
            "plain U-Net skip concatenation instead of the gated fusion"),
    Variant("detached-fusion", "EDLNet, detached fusion", "--detach-fusion", "detach_fusion",
            True, ("detach_fusion", True),
            "detach the decoder features at the fusion, as the published code does (leaves "
            "most weights untrained)"),
)}


def main() -> None:
    """`name flag` lines, for shell scripts."""
    for variant in VARIANTS.values():
        print(variant.name, variant.flag)


if __name__ == "__main__":
    main()
