#!/usr/bin/env python
"""Write one CT as other sites would send it, to check `detect` on each (README, "The real CT
as other sites send it").

    python scripts/acquisition_variants.py [--ct FOLDER_OR_FILE] -o DIR
    emphysema-uad detect DIR -o RESULTS

The variants keep the anatomy and change only how it was acquired or stored: a circular scan
field padded with -3024 HU, fields of view of 340, 300 and 220 mm (the smaller ones cut the
lungs; 220 mm over the lower 90 slices is a cardiac CT's), 5 mm slices, 1.4 mm pixels, the
upper or lower 45 % of the slices, 30 HU of added smooth-kernel noise (a low dose), and the
same voxels stored with reversed x and z axes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from EmphysemaUADLib.acquisition import add_ct_noise  # noqa: E402
from EmphysemaUADLib.lungs import PADDING_HU  # noqa: E402
from EmphysemaUADLib.volume_io import read_image  # noqa: E402

DEFAULT_CT = ROOT.parent / "shared" / "data" / "chest-ct-dicom"


def field(image: sitk.Image, mm: float, dx: int = 0, dy: int = 0) -> sitk.Image:
    """A square field of view `mm` wide, centred `dx`, `dy` pixels from the image centre."""
    n = min(int(round(mm / image.GetSpacing()[0])), image.GetWidth(), image.GetHeight())
    x0 = (image.GetWidth() - n) // 2 + dx
    y0 = (image.GetHeight() - n) // 2 + dy
    return image[x0:x0 + n, y0:y0 + n, :]


def resampled(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """The image on a coarser grid over the same extent, averaged over the new voxel first."""
    old = np.array(image.GetSpacing())
    sigma = [0.4 * max(new - was, 0.0) + 1e-3 for new, was in zip(spacing, old)]
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    size = [int(n * was / new) for n, was, new in zip(image.GetSize(), old, spacing)]
    out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        spacing, image.GetDirection(), -1024.0)
    return sitk.Cast(out, sitk.sitkInt16)


def with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def reindexed(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with its x and z index axes reversed."""
    array = sitk.GetArrayFromImage(image)[::-1, :, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, [0, 2]] *= -1
    out.SetDirection(direction.ravel().tolist())
    out.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetWidth() - 1, 0,
                                                       image.GetDepth() - 1)))
    return out


def variants(image: sitk.Image) -> dict[str, sitk.Image]:
    array = sitk.GetArrayFromImage(image)
    nz, ny, nx = array.shape
    spacing = image.GetSpacing()
    y, x = np.ogrid[:ny, :nx]
    circle = array.copy()
    circle[:, (y - ny / 2) ** 2 + (x - nx / 2) ** 2 > (0.49 * min(nx, ny)) ** 2] = -3024
    # noise clipped at the stored floor (-1024 HU, say), as a scanner clips it
    noise = add_ct_noise(array, spacing[::-1], 30.0, "smooth", 0)
    scanned = array > PADDING_HU
    floor = array[scanned].min()
    low_dose = np.where(scanned, np.maximum(np.rint(noise), floor), array).astype(array.dtype)
    # "upper" by physical position: ITK's +z is superior
    up = np.array(image.GetDirection()).reshape(3, 3)[2, 2] > 0
    upper = image[:, :, int(0.55 * nz):] if up else image[:, :, :int(0.45 * nz) + 1]
    lower = image[:, :, :int(0.45 * nz) + 1] if up else image[:, :, int(0.55 * nz):]
    return {
        "as-is": image,
        "circular-field": with_array(image, circle),
        "field-340mm": field(image, 340.0),
        "field-300mm": field(image, 300.0, dy=5),
        "cardiac-220mm": field(image, 220.0, dx=20, dy=-10)[:, :, :90],
        "slices-5mm": resampled(image, (spacing[0], spacing[1], 5.0)),
        "pixels-1.4mm": resampled(image, (spacing[0] * 1.43, spacing[1] * 1.43, spacing[2])),
        "upper-45pct": upper,
        "lower-45pct": lower,
        "low-dose-30HU": with_array(image, low_dose),
        "axes-reversed": reindexed(image),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=str(DEFAULT_CT), help="CT file or DICOM folder")
    parser.add_argument("-o", "--output", required=True, help="folder for the variants")
    args = parser.parse_args()
    image, source = read_image(args.ct, "CT")
    image = sitk.Cast(image, sitk.sitkInt16)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, variant in variants(image).items():
        sitk.WriteImage(variant, str(out / f"{name}.nii.gz"))
        print(f"{name}: {variant.GetSize()} voxels of "
              f"{' x '.join(f'{s:.2f}' for s in variant.GetSpacing())} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
