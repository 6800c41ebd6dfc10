"""Writes Resources/Screenshots/phantom_and_real_ct.png: a healthy phantom in the geometry of
a clinical thorax CT above the real CT of ../shared/data, each with its lung segmentation
outlined, so a reader can judge how CT-like the phantom is.

Usage: python scripts/make_screenshots.py [--real ../shared/data/chest-ct-dicom]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from EmphysemaUADLib.lungs import segment_lungs
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.render import preview_rgb, save_png, text_block
from EmphysemaUADLib.volume_io import read_ct

ROOT = Path(__file__).resolve().parents[1]


def panel(ct, caption: str) -> np.ndarray:
    image = preview_rgb(ct, outline=segment_lungs(ct))
    return np.concatenate([image, text_block([caption], image.shape[1])], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=str(ROOT.parent / "shared/data/chest-ct-dicom"))
    parser.add_argument("--output", default=str(ROOT / "Resources/Screenshots/"
                                                       "phantom_and_real_ct.png"))
    args = parser.parse_args()
    real = read_ct(args.real)
    spacing = real.geometry.spacing_zyx
    phantom = make_phantom(seed=7, shape=real.shape, spacing=spacing, noise=20.0).ct
    panels = [panel(phantom, "phantom (emphysema-uad phantom --seed 7 --noise 20), "
                             "lungs outlined"),
              panel(real, "real CT (POPI 4D-CT phase, Philips Brilliance), lungs outlined")]
    width = max(p.shape[1] for p in panels)
    rows = [np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0))) for p in panels]
    print(f"written: {save_png(np.concatenate(rows, axis=0), args.output)}")


if __name__ == "__main__":
    main()
