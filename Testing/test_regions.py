"""Regions: built-in zones and imported lobe segmentations of every accepted kind."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.regions import (LOBES, ZONES, lobe_from_name, lung_zones, read_regions)
from EmphysemaUADLib.volume_io import Geometry, Volume, read_ct, read_labels, write_volume
from conftest import SHARED_DATA, requires_shared

GEOMETRY = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def box_lungs(shape=(30, 20, 40)):
    lungs = np.zeros(shape, np.uint8)
    lungs[:, 4:16, 4:18] = 1   # low x index = patient right
    lungs[:, 4:16, 22:36] = 2
    return lungs


def test_zones_are_equal_thirds_from_the_top():
    lungs = box_lungs()
    zones = lung_zones(lungs, GEOMETRY)
    assert set(np.unique(zones)) == {0, *ZONES}
    # identity direction: superior = higher z index, so the upper zone is the last third
    assert (zones[25:, 10, 10] == 1).all() and (zones[:10, 10, 10] == 3).all()
    assert (zones[12, 10, 30] == 5)
    counts = [np.count_nonzero(zones == k) for k in (1, 2, 3)]
    assert max(counts) - min(counts) <= 12 * 14  # at most one slice apart


@pytest.mark.parametrize("slices, zoned", [(1, False), (2, False), (3, True)])
def test_a_lung_on_fewer_than_three_slices_gets_no_zones(slices, zoned):
    """One axial slice has no height: every voxel would be 'upper zone'."""
    zones = lung_zones(box_lungs((slices, 20, 40)), GEOMETRY)
    assert set(np.unique(zones)) == ({0, *ZONES} if zoned else {0})
    # a tilted grid: S varies across one slice, which is still one slice
    c, s = np.cos(0.3), np.sin(0.3)
    tilted = Geometry(GEOMETRY.spacing, GEOMETRY.origin, (1, 0, 0, 0, c, -s, 0, s, c))
    assert set(np.unique(lung_zones(box_lungs((slices, 20, 40)), tilted))) == (
        {0, *ZONES} if zoned else {0})


def test_zones_follow_the_physical_direction():
    flipped = Geometry(GEOMETRY.spacing, GEOMETRY.origin, (1, 0, 0, 0, 1, 0, 0, 0, -1))
    zones = lung_zones(box_lungs(), flipped)
    assert zones[0, 10, 10] == 1 and zones[-1, 10, 10] == 3


@pytest.mark.parametrize("name,label", [
    ("RUL", 1), ("Right upper lobe", 1), ("lung_middle_lobe_right.nii.gz", 2),
    ("lower lobe of right lung", 3), ("left-upper-lobe", 4), ("LLL", 5),
    ("lung_lower_lobe_left", 5), ("right lung", None), ("liver", None), ("upper zone", None)])
def test_lobe_names(name, label):
    assert lobe_from_name(name) == label


def fake_ct(shape=(30, 20, 40)):
    return Volume(np.full(shape, -850, np.float32), GEOMETRY)


def lobes_of(lungs):
    """Upper half of each lung = upper lobe, lower half = lower lobe (no RML)."""
    lobes = np.zeros_like(lungs)
    half = lungs.shape[0] // 2
    lobes[half:][lungs[half:] == 1] = 1
    lobes[:half][lungs[:half] == 1] = 3
    lobes[half:][lungs[half:] == 2] = 4
    lobes[:half][lungs[:half] == 2] = 5
    return lobes


@pytest.mark.parametrize("kind", ["totalseg", "ltrc", "legend"])
def test_lobe_label_maps(tmp_path, kind):
    lungs, ct = box_lungs(), fake_ct()
    lobes = lobes_of(lungs)
    if kind == "totalseg":
        encoded = np.choose(lobes, [0, 12, 13, 14, 10, 11]).astype(np.uint8)
        encoded[0, 0, 0] = 5  # another organ's label is ignored
    elif kind == "ltrc":
        encoded = np.choose(lobes, [0, 3, 4, 5, 1, 2]).astype(np.uint8)
    else:
        encoded = (lobes * 10).astype(np.uint8)
        (tmp_path / "lobes.json").write_text(json.dumps(
            {str(k * 10): LOBES[k].upper() for k in LOBES}))
    path = write_volume(encoded, GEOMETRY, tmp_path / "lobes.nii.gz")
    regions, legend = read_regions(path, ct, lungs)
    np.testing.assert_array_equal(regions, lobes)
    assert legend == {k: LOBES[k] for k in (1, 3, 4, 5)}


def test_custom_legend_keeps_its_names(tmp_path):
    lungs, ct = box_lungs(), fake_ct()
    labels = np.where(lungs > 0, 7, 0).astype(np.uint8)
    labels[:10][lungs[:10] > 0] = 9
    (tmp_path / "parts.json").write_text(json.dumps({"7": "apical", "9": {"name": "basal"}}))
    regions, legend = read_regions(write_volume(labels, GEOMETRY, tmp_path / "parts.nrrd"),
                                   ct, lungs)
    assert legend == {1: "apical", 2: "basal"}
    assert np.count_nonzero(regions == 2) == np.count_nonzero(lungs[:10])


def test_lobes_on_another_grid_are_resampled(tmp_path):
    lungs, ct = box_lungs(), fake_ct()
    lobes = lobes_of(lungs)
    # the same lobes at half the in-plane resolution (2 mm pixels)
    fine = GEOMETRY.apply(sitk.GetImageFromArray(np.choose(lobes, [0, 3, 4, 5, 1, 2])
                                                 .astype(np.uint8)))
    coarse = sitk.Resample(fine,
                           [20, 10, 30], sitk.Transform(), sitk.sitkNearestNeighbor,
                           (0.5, 0.5, 0.0), (2.0, 2.0, 2.0))
    path = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(coarse, str(path))
    regions, _ = read_regions(path, ct, lungs)
    agree = np.count_nonzero(regions[lungs > 0] == lobes[lungs > 0]) / np.count_nonzero(lungs)
    assert agree > 0.9


def test_lobes_that_miss_the_lungs_are_refused(tmp_path):
    lungs, ct = box_lungs(), fake_ct()
    shifted = Geometry(GEOMETRY.spacing, (0.0, 0.0, 500.0), GEOMETRY.direction)
    path = write_volume(np.choose(lobes_of(lungs), [0, 3, 4, 5, 1, 2]).astype(np.uint8),
                        shifted, tmp_path / "elsewhere.nii.gz")
    with pytest.raises(InputError, match="covers only 0% of the lungs"):
        read_regions(path, ct, lungs)


def test_unknown_labels_without_legend_are_refused(tmp_path):
    lungs, ct = box_lungs(), fake_ct()
    path = write_volume((lungs * 40).astype(np.uint8), GEOMETRY, tmp_path / "odd.nii.gz")
    with pytest.raises(InputError, match="JSON legend"):
        read_regions(path, ct, lungs)


def realigned_copy(source, target, ct):
    """The example's lobe files cover the CT's top slices although their header origin is the
    CT's; a copy with the origin moved to those slices is where they belong."""
    labels = read_labels(source)
    offset = ct.shape[0] - labels.shape[0]
    origin = np.asarray(ct.geometry.origin) + np.asarray(ct.geometry.direction).reshape(3, 3) \
        @ (np.array([0, 0, offset]) * np.asarray(ct.geometry.spacing))
    write_volume(labels.array, Geometry(labels.geometry.spacing, tuple(origin),
                                       labels.geometry.direction), target)


@requires_shared
def test_totalsegmentator_example_both_layouts(tmp_path):
    from EmphysemaUADLib.lungs import segment_lungs

    example = SHARED_DATA / "totalsegmentator-example"
    ct = read_ct(example / "example_ct.nii.gz")
    lungs = segment_lungs(ct)
    # as shipped, the header places the lobes 82 slices below the lungs: refused clearly
    with pytest.raises(InputError, match="does not belong to this CT"):
        read_regions(example / "example_seg.nii.gz", ct, lungs)
    realigned_copy(example / "example_seg.nii.gz", tmp_path / "seg.nii.gz", ct)
    (tmp_path / "lobes").mkdir()
    for f in (example / "lobes").iterdir():
        realigned_copy(f, tmp_path / "lobes" / f.name, ct)
    multilabel, legend = read_regions(tmp_path / "seg.nii.gz", ct, lungs)
    folder, legend2 = read_regions(tmp_path / "lobes", ct, lungs)
    assert set(legend) >= {3, 5} and legend == legend2
    agree = np.count_nonzero(multilabel == folder) / multilabel.size
    assert agree > 0.999
    right = np.isin(multilabel, [1, 2, 3])
    assert (lungs[right] == 1).mean() > 0.95
