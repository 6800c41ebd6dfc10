"""The synthetic chest CT: determinism, geometry, HU statistics, anatomy and truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.phantom import SEVERITIES, make_phantom, write_phantom
from EmphysemaUADLib.regions import ZONES, lung_zones
from EmphysemaUADLib.staging import stage_of

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def healthy():
    return make_phantom(3, shape=SHAPE, noise=20.0)


@pytest.fixture(scope="module")
def by_severity():
    return {sev: make_phantom(4, shape=(40, 80, 80), spacing=(3.0, 2.0, 2.0),
                              emphysema=sev, morphology="mixed") for sev in SEVERITIES}


def test_same_seed_same_phantom_other_seed_other_phantom(healthy):
    again = make_phantom(3, shape=SHAPE, noise=20.0)
    np.testing.assert_array_equal(again.ct.array, healthy.ct.array)
    np.testing.assert_array_equal(again.lungs, healthy.lungs)
    other = make_phantom(7, shape=SHAPE, noise=20.0)
    assert not np.array_equal(other.lungs, healthy.lungs)
    assert other.truth["regions"]["whole lung"]["volume_ml"] != \
        healthy.truth["regions"]["whole lung"]["volume_ml"]


def test_shape_spacing_and_geometry_are_honoured(healthy):
    assert healthy.ct.array.shape == SHAPE and healthy.ct.array.dtype == np.float32
    g = healthy.ct.geometry
    assert g.spacing == (1.6, 1.6, 2.5)  # ITK order x, y, z
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # reconstruction centred on the isocentre in-plane
    assert g.origin[0] == pytest.approx(-(SHAPE[2] - 1) / 2 * 1.6)
    assert g.origin[1] == pytest.approx(-(SHAPE[1] - 1) / 2 * 1.6)
    for array in (healthy.lungs, healthy.lesions, healthy.zones, healthy.tissues):
        assert array.shape == SHAPE and array.dtype == np.uint8
    odd = make_phantom(1, shape=(6, 40, 56), spacing=(5.0, 1.2, 2.0), noise=0.0)
    assert odd.ct.array.shape == (6, 40, 56) and odd.ct.geometry.spacing == (2.0, 1.2, 5.0)
    assert (odd.lungs > 0).any()


def test_single_slice_works():
    p = make_phantom(2, shape=(1, 96, 96), spacing=(2.0, 3.2, 3.2), emphysema="moderate")
    assert p.ct.array.shape == (1, 96, 96)
    assert set(np.unique(p.lungs)) == {0, 1, 2}
    assert 0 < p.truth["regions"]["whole lung"]["emphysema_index_percent"] < 40


def interior(mask, voxels=2):
    return ndimage.binary_erosion(mask, iterations=voxels)


def test_hu_statistics(healthy):
    ct, tissues = healthy.ct.array, healthy.tissues
    lung = healthy.lungs > 0
    assert -900 < ct[lung].mean() < -800
    assert -900 < ct[lung & (tissues == 4)].mean() < -820  # parenchyma without the vessels
    soft = interior(tissues == 2, 3)
    assert soft.sum() > 1000 and 0 < ct[soft].mean() < 60
    air = interior(tissues == 0, 3)
    assert abs(ct[air].mean() + 1000) < 10
    # the muscle is uniform: its spread is the noise (in-plane interior, one slice)
    z = SHAPE[0] // 2
    flat = ndimage.binary_erosion(tissues[z] == 2, iterations=3)
    assert 0.8 * 20 < ct[z][flat].std() < 1.25 * 20
    bone = tissues == 3
    assert ct[bone].max() > 500


def test_anatomy_sides_and_anterior_junction(healthy):
    lungs = healthy.lungs
    x = np.arange(SHAPE[2])
    # patient right = low x index with identity (LPS) direction
    assert x[np.nonzero(lungs == 1)[2]].mean() < SHAPE[2] / 2 < x[np.nonzero(lungs == 2)[2]].mean()
    # the lungs come within a few mm of each other in front of the mediastinum
    gaps = []
    for z in range(SHAPE[0]):
        for y in range(SHAPE[1] // 2):
            right, left = np.flatnonzero(lungs[z, y] == 1), np.flatnonzero(lungs[z, y] == 2)
            if right.size and left.size:
                gaps.append((left.min() - right.max() - 1) * 1.6)
    assert gaps and 0 <= min(gaps) <= 4.0
    # a whole thorax: air above the body in front, table behind it, an airway in the middle
    assert healthy.tissues[:, 0, :].max() == 0 and (healthy.tissues == 7).any()
    assert (healthy.tissues == 8).any()


def test_truth_is_consistent_and_ordered_by_severity(by_severity):
    indices = []
    for severity, p in by_severity.items():
        assert not (p.lesions.astype(bool) & (p.lungs == 0)).any()  # lesions inside the lungs
        np.testing.assert_array_equal(p.zones, lung_zones(p.lungs, p.ct.geometry))
        regions = p.truth["regions"]
        masks = {"whole lung": p.lungs > 0, "right lung": p.lungs == 1, "left lung": p.lungs == 2,
                 **{name: p.zones == value for value, name in ZONES.items()}}
        assert set(regions) == set(masks)
        for name, mask in masks.items():
            expected = 100.0 * np.count_nonzero(p.lesions[mask]) / mask.sum()
            assert regions[name]["emphysema_index_percent"] == pytest.approx(expected, abs=1e-4)
            assert regions[name]["volume_ml"] == pytest.approx(
                mask.sum() * p.ct.geometry.voxel_ml, abs=0.01)
            assert regions[name]["stage"] == stage_of(regions[name]["emphysema_index_percent"])
        assert p.truth["stage"] == regions["whole lung"]["stage"]
        assert p.truth["seed"] == 4 and p.truth["parameters"]["emphysema"] == severity
        indices.append(regions["whole lung"]["emphysema_index_percent"])
    assert indices[0] == 0 and indices == sorted(indices) and len(set(indices)) == 4
    assert 1.0 < indices[1] < 5 and 5 < indices[2] < 25 and indices[3] > 25
    # the anatomy does not depend on the emphysema; lesions darken the lungs
    np.testing.assert_array_equal(by_severity["none"].lungs, by_severity["severe"].lungs)
    lesion = by_severity["severe"].lesions > 0
    before, after = (by_severity[k].ct.array[lesion].mean() for k in ("none", "severe"))
    assert after < -930 and after < before - 60


def test_write_phantom_writes_ct_preview_and_truth(tmp_path, healthy):
    written = write_phantom(healthy, tmp_path / "case.nii.gz", truth_dir=tmp_path / "truth")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == ["case.nii.gz", "case.png", "truth/lesions.nii.gz", "truth/lungs.nii.gz",
                     "truth/truth.json", "truth/zones.nii.gz"]
    ct = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    for name in ("lungs", "lesions", "zones"):
        label = sitk.ReadImage(str(tmp_path / "truth" / f"{name}.nii.gz"))
        assert label.GetSize() == ct.GetSize()
        np.testing.assert_allclose(label.GetOrigin(), ct.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(label.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(ct.GetSpacing(), healthy.ct.geometry.spacing, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(
        sitk.ReadImage(str(tmp_path / "truth" / "lungs.nii.gz"))), healthy.lungs)
    assert np.abs(sitk.GetArrayFromImage(ct) - healthy.ct.array).max() <= 0.5
    truth = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert truth["regions"]["whole lung"]["volume_ml"] > 0
    png = sitk.ReadImage(str(tmp_path / "case.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > SHAPE[2] * 2
    only_png = write_phantom(healthy, tmp_path / "b.nrrd", png=tmp_path / "views" / "b.png")
    assert [p.name for p in only_png] == ["b.nrrd", "b.png"]


def test_cli_writes_a_phantom(tmp_path, capsys):
    from EmphysemaUADLib.cli import main

    out = tmp_path / "p.nii.gz"
    assert main(["phantom", "-o", str(out), "--shape", "8", "48", "48", "--spacing", "5", "7",
                 "7", "--emphysema", "mild", "--seed", "2"]) == 0
    assert out.is_file() and (tmp_path / "p.png").is_file()
    assert main(["phantom", "-o", str(out), "--shape", "8", "4", "48"]) == 2
    assert "shape" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [dict(shape=(0, 64, 64)), dict(spacing=(1.0, -1.0, 1.0)),
                                    dict(noise=-3), dict(kernel="bone"),
                                    dict(emphysema="extreme"), dict(morphology="worley"),
                                    dict(seed=-1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(InputError):
        make_phantom(**{"shape": (4, 32, 32), **kwargs})
