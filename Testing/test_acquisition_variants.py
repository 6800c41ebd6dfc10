"""scripts/acquisition_variants.py: each variant keeps the anatomy and changes what it says."""
import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from EmphysemaUADLib.phantom import make_phantom

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("acquisition_variants",
                                               ROOT / "scripts" / "acquisition_variants.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_variants_of_a_phantom():
    p = make_phantom(seed=4, emphysema="none", shape=(120, 128, 128), spacing=(2.0, 2.5, 2.5))
    image = sitk.GetImageFromArray(np.rint(p.ct.array).astype(np.int16))
    image.SetSpacing(p.ct.geometry.spacing)
    image.SetOrigin(p.ct.geometry.origin)
    image.SetDirection(p.ct.geometry.direction)
    variants = script.variants(image)
    array = sitk.GetArrayFromImage(image)
    assert set(variants) >= {"as-is", "field-300mm", "cardiac-220mm", "slices-5mm",
                             "axes-reversed", "low-dose-30HU", "upper-45pct", "lower-45pct"}
    # stored reversed, the same physical image: resampled onto the original grid it is equal
    back = sitk.Resample(variants["axes-reversed"], image, sitk.Transform(),
                         sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    # a field of view is a centred crop that keeps physical positions
    crop = variants["field-300mm"]
    assert crop.GetSize()[0] == 120 and crop.GetSpacing() == image.GetSpacing()
    index = image.TransformPhysicalPointToIndex(crop.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop),
                                  array[:, index[1]:index[1] + 120, index[0]:index[0] + 120])
    assert variants["slices-5mm"].GetSpacing()[2] == 5.0
    assert variants["slices-5mm"].GetSize()[2] == 120 * 2 // 5
    # upper and lower by physical position (ITK's +z is superior)
    top = lambda v: v.TransformIndexToPhysicalPoint((0, 0, v.GetDepth() - 1))[2]  # noqa: E731
    assert top(variants["upper-45pct"]) == top(image) > top(variants["lower-45pct"])
    # noise only inside the scan field, never below the stored floor
    noisy = sitk.GetArrayFromImage(variants["low-dose-30HU"])
    assert noisy.min() >= array.min() and 20 < np.std(noisy.astype(float) - array) < 40
