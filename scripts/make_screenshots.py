"""Writes Resources/Screenshots/phantom_and_real_ct.png: a healthy phantom in the geometry of
a clinical thorax CT above the real CT of ../shared/data, each with its lung segmentation
outlined, so a reader can judge how CT-like the phantom is.

Usage: python scripts/make_screenshots.py [--real ../shared/data/chest-ct-dicom]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from EmphysemaUADLib.lungs import segment_lungs
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.plots import grey_colorbar, image_panel, legend_patches, save_figure
from EmphysemaUADLib.render import LUNG_WINDOW, OUTLINE_COLORS, preview_views
from EmphysemaUADLib.volume_io import read_ct

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=str(ROOT.parent / "shared/data/chest-ct-dicom"))
    parser.add_argument("--output", default=str(ROOT / "Resources/Screenshots/"
                                                       "phantom_and_real_ct.png"))
    args = parser.parse_args()
    real = read_ct(args.real)
    spacing = real.geometry.spacing_zyx
    phantom = make_phantom(seed=7, shape=real.shape, spacing=spacing, noise=20.0).ct
    fig = Figure(figsize=(11, 10.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for row, (ct, caption) in zip(axes, (
            (phantom, "phantom (emphysema-uad phantom --seed 7 --noise 20)"),
            (real, "real CT (POPI 4D-CT phase, Philips Brilliance)"))):
        axial, coronal, pixel = preview_views(ct, outline=segment_lungs(ct))
        image_panel(row[0], axial, f"{caption}\naxial", pixel_mm=pixel)
        image_panel(row[1], coronal, "\ncoronal", top="S", pixel_mm=pixel)
    grey_colorbar(fig, list(axes.ravel()), LUNG_WINDOW)
    legend_patches(fig, [("right lung (segmentation outline)", OUTLINE_COLORS[1], "line"),
                         ("left lung", OUTLINE_COLORS[2], "line")],
                   loc="outside lower center", ncols=2)
    print(f"written: {save_figure(fig, args.output)}")


if __name__ == "__main__":
    main()
