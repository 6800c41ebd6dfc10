"""Parenchyma ROIs (roi.py): small images of lung tissue without a whole lung are measured
over their part at lung density, the network seeing them mirrored at their edges; whole CTs
are untouched; every refusal is a one-line error."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from EmphysemaUADLib.calibration import check_hu
from EmphysemaUADLib.cli import main
from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.inference import predict_anomaly
from EmphysemaUADLib.measurements import NOT_IN_SCAN
from EmphysemaUADLib.roi import ROI, find_lungs
from EmphysemaUADLib.volume_io import Geometry, Volume, read_ct, read_labels, write_volume

PATCHES = SHARED_DATA / "emphysema-hrct-slices" / "patch_labels.csv"
PIXEL = 0.8


def roi_image(size=48, holes=False, seed=0) -> np.ndarray:
    """One slice of lung parenchyma (-850 HU, noise 20 HU) with chest wall (+40 HU) along
    its left 12 columns, a vessel (+30 HU) inside the lung and, with `holes`, air-dark
    holes (-990 HU)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-850.0, 20.0, (1, size, size)).astype(np.float32)
    hu[:, :, :12] = rng.normal(40.0, 20.0, (1, size, 12))
    yy, xx = np.mgrid[:size, :size]
    hu[0][(yy - size // 2) ** 2 + (xx - 30) ** 2 <= 9] = 30.0  # the vessel, 7 pixels across
    if holes:
        for cy, cx in ((12, 22), (36, 40), (38, 20)):
            hu[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = -990.0
    return hu


def as_volume(hu, pixel=PIXEL, source="roi") -> Volume:
    return Volume(hu, Geometry((pixel, pixel, 1.25), (0.0, 0.0, 0.0),
                               (1, 0, 0, 0, 1, 0, 0, 0, 1)), source)


@pytest.fixture(scope="module")
def detector():
    return Detector.load(None, "cpu")


def test_the_lung_of_an_roi_is_its_lung_density_part_vessels_included():
    lungs = find_lungs(as_volume(roi_image()))
    assert set(np.unique(lungs)) == {0, ROI}
    assert not lungs[0, :, :10].any()  # the chest wall
    assert lungs[0, 24, 30]  # the vessel, enclosed by lung
    assert lungs[0, :, 14:].all()


def test_an_roi_is_measured_as_a_whole_lung_without_sides(detector):
    ct = as_volume(roi_image(holes=True))
    result = detect_case(ct, detector, warn=False)
    assert result.region_kind == "roi" and result.legend == {}
    whole, right, left = result.measurements.rows[:3]
    lung_voxels = np.count_nonzero(result.lungs)
    assert whole.volume_ml == pytest.approx(lung_voxels * ct.geometry.voxel_ml, abs=0.01)
    assert right.coverage == left.coverage == NOT_IN_SCAN and right.empty and left.empty
    assert not result.anomaly[result.lungs == 0].any()
    healthy = detect_case(as_volume(roi_image(seed=1)), detector, warn=False)
    assert result.anomaly_score > healthy.anomaly_score


def test_the_network_sees_an_roi_mirrored_and_a_ct_framed_by_air():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x[0, 0].numpy().copy())
            return x, torch.zeros_like(x)

    hu = roi_image(size=40)
    lungs = np.ones(hu.shape, np.uint8)
    for roi in (True, False):
        predict_anomaly(hu, lungs, Recorder(), torch.device("cpu"), roi=roi)
    mirrored, framed = seen
    assert mirrored.shape == framed.shape == (48, 48)
    inner = mirrored[4:44, 4:44]
    assert np.allclose(mirrored[:4, 4:44], inner[:4][::-1])  # the top rows, mirrored
    assert np.allclose(framed[:4], 0.0)  # -1000 HU is 0 in the network's units


def test_an_roi_gets_no_hu_scale_check_and_says_what_it_is(detector, capsys):
    ct = as_volume(roi_image() + 80.0)  # however shifted: there is no body to tell
    assert check_hu(ct).shift_hu is None and check_hu(ct).air_hu is None
    messages = []

    class Log:
        def log(self, text, level="info"):
            messages.append(text)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    detect_case(ct, detector, progress=Log())
    assert any("measured as an ROI of parenchyma" in m and "(38 x 38 mm)" in m
               for m in messages)
    assert not any("reach" in m for m in messages)  # no partial-scan warning


def test_a_whole_ct_is_not_an_roi(detector):
    hu = roi_image(size=160)  # 128 mm across: too large to be an ROI
    assert not find_lungs(as_volume(hu)).any()


def test_a_small_parenchyma_image_is_read_as_ct_and_other_small_images_are_not(tmp_path):
    geometry = as_volume(roi_image()).geometry
    lung_only = roi_image()
    lung_only[:, :, :12] = -850.0  # no soft tissue at all: a whole CT would be refused
    write_volume(lung_only, geometry, tmp_path / "roi.nii.gz")
    assert read_ct(tmp_path / "roi.nii.gz").shape == (1, 48, 48)
    for name, values in (("mr", np.random.default_rng(0).uniform(0, 900, (1, 48, 48))),
                         ("wall", np.random.default_rng(0).normal(40, 20, (1, 48, 48)))):
        write_volume(values.astype(np.float32), geometry, tmp_path / f"{name}.nii.gz")
        with pytest.raises(InputError, match="nor a fifth of it at lung density"):
            read_ct(tmp_path / f"{name}.nii.gz")


def test_refusals_name_the_image(detector):
    with pytest.raises(InputError, match="an ROI of 12 x 12 pixels is too small"):
        find_lungs(as_volume(np.full((1, 12, 12), -850.0, np.float32)))
    ct = as_volume(roi_image())
    with pytest.raises(InputError, match="has no lobes to measure"):
        detect_case(ct, detector, lobes=ct, warn=False)


def test_detect_writes_an_roi_report(tmp_path):
    write_volume(roi_image(holes=True), as_volume(roi_image()).geometry, tmp_path / "p.nii.gz")
    assert main(["detect", str(tmp_path / "p.nii.gz"), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--progress", "none"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert rows[0]["case"] == "p" and float(rows[0]["volume_ml"]) > 0
    case = tmp_path / "out" / "p"
    assert (case / "overlay.png").stat().st_size > 0
    assert json.loads((case / "report.json").read_text())["lung_labels"] == {"3": "ROI lung"}
    lungs = read_labels(case / "lungs.nii.gz").array
    assert set(np.unique(lungs)) == {0, ROI}
    volume_ml = float(rows[0]["volume_ml"])
    assert np.count_nonzero(lungs) * PIXEL * PIXEL * 1.25 / 1000.0 == pytest.approx(volume_ml,
                                                                                   abs=0.01)


@pytest.mark.skipif(not PATCHES.is_file(), reason=f"{PATCHES} not found (../shared/data)")
def test_real_labelled_patches_are_ranked(tmp_path):
    """The 90 labelled HRCT ROIs of ../shared/data: the bundled model's anomaly score ranks
    normal against emphysema as measured (AUROC 1.00, README "Real emphysema")."""
    assert main(["validate", str(PATCHES), "-o", str(tmp_path / "v"), "--device", "cpu",
                 "--progress", "none", "--bootstrap", "0"]) == 0
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    auroc = next(r for r in report["metrics"]["metrics"] if r["key"] == "auroc")
    assert auroc["values"]["anomaly_score"]["value"] >= 0.97
