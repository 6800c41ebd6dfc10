"""The slice cache of healthy training CTs: finding cases, building, reusing, skipping, split."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, requires_shared
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.phantom import make_phantom, write_phantom
from EmphysemaUADLib.progress import Progress
from EmphysemaUADLib.training_data import (SliceCache, build_slice_cache, find_training_cases,
                                           cases_below)

SHAPE = (12, 64, 64)
SPACING = (5.0, 4.0, 4.0)


def write_dicom_series(volume, folder):
    """One CT as a DICOM series (one file per axial slice), HU stored with intercept 0."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.round(volume.array).astype(np.int16))
    volume.geometry.apply(image)
    series = "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10 ** 12)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        origin = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {"0008|0060": "CT", "0020|000e": series, "0020|0013": str(z + 1),
                "0008|0018": f"{series}.{z + 1}", "0020|0032": "\\".join(map(str, origin)),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(image.GetSpacing()[2]),
                "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """Two NIfTI phantoms, one DICOM-series phantom in a nested folder, one damaged file."""
    root = tmp_path_factory.mktemp("healthy")
    for seed in (1, 2):
        write_phantom(make_phantom(seed, shape=SHAPE, spacing=SPACING, noise=15.0),
                      root / f"case{seed}.nii.gz")
    write_dicom_series(make_phantom(3, shape=SHAPE, spacing=SPACING, noise=15.0).ct,
                       root / "site_b" / "patient3" / "series1")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    (root / "notes.txt").write_text("not a case")
    return root


def json_progress():
    stream = io.StringIO()
    return Progress("json", stream=stream), stream


def events(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_cases_below_recurses_and_ignores_other_files(healthy, tmp_path):
    names = [c.relative_to(healthy).as_posix() for c in cases_below(healthy)]
    assert names == ["broken.nii.gz", "case1.nii.gz", "case2.nii.gz",
                     "site_b/patient3/series1"]
    assert find_training_cases([healthy, healthy / "site_b"]) == cases_below(healthy)
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.nii.gz").write_bytes(b"")
    (tmp_path / "empty" / "readme.md").write_text("no CT here")
    with pytest.raises(InputError, match="holds no CT"):
        cases_below(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        cases_below(tmp_path / "missing")


def test_cache_build_skip_and_reuse(healthy, tmp_path):
    cases = cases_below(healthy)
    progress, stream = json_progress()
    cache = build_slice_cache(cases, tmp_path / "cache", size=64, progress=progress)

    # the damaged file is skipped, listed in a warning, and the others are used
    warnings = [e for e in events(stream) if e.get("level") == "warning"]
    assert len(warnings) == 1 and "broken.nii.gz" in warnings[0]["message"]
    assert [s["path"] for s in cache.skipped] == [str(healthy / "broken.nii.gz")]
    assert cache.n_cases == 3 and cache.cases[2]["path"].endswith("series1")

    n = len(cache)
    assert 3 <= n <= 3 * SHAPE[0]
    assert cache.hu.shape == (n, 64, 64) and cache.hu.dtype == np.int16
    assert cache.lungs_bits.shape == (n, 64, 8)
    assert isinstance(cache.hu, np.memmap)
    assert sorted(set(np.asarray(cache.case_index).tolist())) == [0, 1, 2]
    np.testing.assert_allclose(cache.spacing, np.tile(SPACING[1:], (n, 1)))
    for i in range(n):  # every kept slice holds lung, and lung is dark
        lung = cache.lungs(i).astype(bool)
        assert lung.sum() >= 64
        assert np.median(cache.hu[i][lung]) < -600
    # lung box + margin is smaller than 64: padded with air at the border
    assert (np.asarray(cache.hu[:, 0, :]) <= -900).all()

    for number, case in enumerate(cache.cases):  # the manifest agrees with the arrays
        rows = np.flatnonzero(np.asarray(cache.case_index) == number)
        assert case["first"] == rows[0] and case["slices"] == len(rows)
        assert np.all(np.diff(cache._map("slice", np.int32, (len(cache),))[rows]) > 0)

    # unchanged inputs: reused without reading, the skip still reported
    stamp = os.stat(tmp_path / "cache" / "hu.int16").st_mtime_ns
    progress, stream = json_progress()
    again = build_slice_cache(cases, tmp_path / "cache", size=64, progress=progress)
    assert not [e for e in events(stream) if e["event"] == "cache"]
    assert any("broken.nii.gz" in e.get("message", "") for e in events(stream))
    assert os.stat(tmp_path / "cache" / "hu.int16").st_mtime_ns == stamp
    np.testing.assert_array_equal(again.hu, cache.hu)

    # a changed input, or another size, rebuilds
    os.utime(cases[1], ns=(stamp, stamp + 10 ** 9))
    progress, stream = json_progress()
    build_slice_cache(cases, tmp_path / "cache", size=64, progress=progress)
    assert len([e for e in events(stream) if e["event"] == "cache"]) == 4
    assert build_slice_cache(cases, tmp_path / "cache", size=80).hu.shape[1:] == (80, 80)
    assert not list((tmp_path / "cache").glob(".build-*"))  # staging folders removed


def test_cache_pickles_without_its_data(healthy, tmp_path):
    import pickle

    cache = build_slice_cache(cases_below(healthy)[1:3], tmp_path / "c", size=64)
    np.asarray(cache.hu)  # maps opened
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob).hu[3], cache.hu[3])


def test_no_usable_case_is_an_input_error(healthy, tmp_path):
    mr_like = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 4, sitk.sitkInt16), str(mr_like))
    with pytest.raises(InputError, match="no usable training CT") as info:
        build_slice_cache([healthy / "broken.nii.gz", mr_like], tmp_path / "cache", size=64)
    assert "broken.nii.gz" in str(info.value) and "flat.nii.gz" in str(info.value)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    with pytest.raises(InputError, match="multiple of 16"):
        build_slice_cache([healthy / "case1.nii.gz"], tmp_path / "cache", size=70)


def test_split_by_case(healthy, tmp_path):
    cache = build_slice_cache(cases_below(healthy), tmp_path / "cache", size=64)
    case_of = np.asarray(cache.case_index)
    train, val = cache.split_by_case(0.3, seed=0)
    assert len(train) + len(val) == len(cache)
    assert not set(case_of[train]) & set(case_of[val])
    assert len(set(case_of[val])) == 1  # 30 % of 3 cases
    assert np.array_equal(cache.split_by_case(0.3, seed=0)[1], val)  # seeded

    one = build_slice_cache([healthy / "case1.nii.gz"], tmp_path / "one", size=64)
    train, val = one.split_by_case(0.2, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(one)))
    assert len(val) >= 1 and len(train) >= 1
    with pytest.raises(InputError):
        one.split_by_case(0.0)


@requires_shared
def test_real_dicom_case(tmp_path):
    cache = build_slice_cache([SHARED_DATA / "chest-ct-dicom"], tmp_path / "cache", size=384)
    assert isinstance(cache, SliceCache) and cache.n_cases == 1
    assert 60 <= len(cache) <= 141
    lung_share = np.mean([cache.lungs(i).mean() for i in range(0, len(cache), 10)])
    assert 0.05 < lung_share < 0.7
    np.testing.assert_allclose(cache.spacing[0], (0.977, 0.977), atol=0.01)


def test_a_shifted_hu_scale_is_corrected_and_said(tmp_path):
    from EmphysemaUADLib.training_data import case_slices

    phantom = make_phantom(4, shape=(12, 160, 160), spacing=(5.0, 1.8, 1.8), noise=15.0)
    for name, shift in (("plain", 0.0), ("shifted", 80.0)):
        ct = dataclasses.replace(phantom.ct, array=phantom.ct.array + np.float32(shift))
        write_phantom(dataclasses.replace(phantom, ct=ct), tmp_path / f"{name}.nii.gz")
    progress, stream = json_progress()
    plain = case_slices(tmp_path / "plain.nii.gz", 192, progress)
    assert not [e for e in events(stream) if e.get("level") == "warning"]
    shifted = case_slices(tmp_path / "shifted.nii.gz", 192, progress)
    warnings = [e["message"] for e in events(stream) if e.get("level") == "warning"]
    assert len(warnings) == 1 and "shift of +8" in warnings[0] and "taken off" in warnings[0]
    lungs = np.unpackbits(plain.lungs, axis=-1).astype(bool)
    difference = shifted.hu.astype(np.float32) - plain.hu
    assert abs(float(np.median(difference[lungs]))) <= 8  # the shift measured and taken off
