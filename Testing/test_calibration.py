"""The HU scale check: a phantom (air -1000, fat -95 HU) reads calibrated; shifted as a whole
it reads the shift, which --correct-hu takes off; air alone off (fat where it should be), no
air in the field of view, or a field-of-view border stored as -1024 are not read as a shift;
a patient without fat is read from air.
The real HRCT slices of ../shared/data read a shift of about +78 HU, the other real scans
none."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import SHARED_DATA, requires_shared
from EmphysemaUADLib.calibration import TOLERANCE_HU, check_hu, corrected
from EmphysemaUADLib.cli import main
from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.phantom import make_phantom, write_phantom
from EmphysemaUADLib.progress import Progress
from EmphysemaUADLib.volume_io import read_ct

PHANTOM = dict(shape=(24, 192, 192), spacing=(5.0, 1.6, 1.6), noise=20.0)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3, emphysema="moderate", morphology="centrilobular", **PHANTOM)


def shifted(ct, shift):
    return dataclasses.replace(ct, array=ct.array.astype(np.float32) + np.float32(shift))


def test_a_calibrated_phantom_reads_no_shift(phantom):
    check = check_hu(phantom.ct)
    assert abs(check.air_hu + 1000) <= 10 and abs(check.fat_hu + 95) <= 15
    assert not check.shifted and check.shift_hu is None


@pytest.mark.parametrize("shift", [-60.0, 40.0, 80.0])
def test_a_whole_scale_shift_is_measured_and_taken_off(phantom, shift):
    check = check_hu(shifted(phantom.ct, shift))
    assert check.shifted and abs(check.shift_hu - shift) <= 8
    back = corrected(shifted(phantom.ct, shift), check)
    assert abs(float(np.median(back.array - phantom.ct.array))) <= 8
    assert not check_hu(back).shifted


def test_a_shift_within_the_tolerance_is_left_alone(phantom):
    assert not check_hu(shifted(phantom.ct, TOLERANCE_HU / 2)).shifted


def test_air_off_while_fat_is_right_is_not_a_shift(phantom):
    array = phantom.ct.array.astype(np.float32).copy()
    array[array < -900] += 70.0  # air (outside and in the lungs' darkest voxels) only
    check = check_hu(dataclasses.replace(phantom.ct, array=array))
    assert check.air_hu is not None and abs(check.air_hu + 930) <= 10
    assert check.fat_hu is not None and abs(check.fat_hu + 95) <= 15
    assert not check.shifted


def test_a_patient_without_fat_reads_the_shift_from_air(phantom):
    # no subcutaneous fat: the blur where lung and skin meet soft tissue passes through fat's
    # range, and once read a false fat peak (-130 HU) that vetoed the shift
    array = phantom.ct.array.astype(np.float32).copy()
    fat = phantom.tissues == 1
    array[fat] = 45.0 + np.random.default_rng(0).normal(0.0, 20.0, np.count_nonzero(fat))
    check = check_hu(shifted(dataclasses.replace(phantom.ct, array=array), 80.0))
    assert check.fat_hu is None
    assert check.shifted and abs(check.shift_hu - 80.0) <= 8


def test_no_air_in_the_field_of_view_is_not_checked(phantom):
    ct = phantom.ct
    z, y, x = (n // 2 for n in ct.shape)
    body_only = dataclasses.replace(ct, array=ct.array[:, y - 30:y + 30, x - 50:x + 50])
    check = check_hu(body_only)
    assert check.air_hu is None and not check.shifted
    assert "not checked" in check.describe()


def test_a_field_of_view_border_at_minus_1024_is_not_air(phantom):
    array = phantom.ct.array.astype(np.float32).copy()
    yy, xx = np.mgrid[:array.shape[1], :array.shape[2]]
    r = array.shape[1] / 2
    array[:, (yy - r + 0.5) ** 2 + (xx - r + 0.5) ** 2 > (0.97 * r) ** 2] = -1024.0
    check = check_hu(dataclasses.replace(phantom.ct, array=array))
    assert abs(check.air_hu + 1000) <= 10 and not check.shifted


def test_detection_corrects_by_default_and_says_so_either_way(phantom):
    detector = Detector.load(device="cpu")
    assert detector.correct_hu
    ct = shifted(phantom.ct, 80.0)
    messages = []

    class Recorder(Progress):
        def log(self, message, level="info"):
            messages.append((level, message))

    plain = detect_case(ct, Detector.load(device="cpu", correct_hu=False),
                        progress=Recorder("none"))
    assert plain.hu_check.shifted and not plain.hu_corrected
    assert any(level == "warning" and "kept as stored" in m for level, m in messages)
    messages.clear()
    fixed = detect_case(ct, detector, progress=Recorder("none"))
    assert any(level == "warning" and "taken off" in m and "--no-correct-hu" in m
               for level, m in messages)
    assert fixed.hu_corrected and abs(float(np.median(fixed.ct.array - phantom.ct.array))) <= 8
    # the densities follow the scale: a lung 80 HU too bright has far less lung below -950
    assert fixed.measurements.whole.laa950_percent > plain.measurements.whole.laa950_percent
    reference = detect_case(phantom.ct, detector)
    assert not reference.hu_corrected and reference.hu_check.shift_hu is None
    assert fixed.measurements.whole.laa950_percent == pytest.approx(
        reference.measurements.whole.laa950_percent, abs=1.0)


def test_the_cli_reports_the_check_and_the_correction(phantom, tmp_path):
    write_phantom(dataclasses.replace(phantom, ct=shifted(phantom.ct, 80.0)),
                  tmp_path / "shifted.nii.gz")
    for flag, name in ((["--no-correct-hu"], "plain"), ([], "fixed")):
        assert main(["detect", str(tmp_path / "shifted.nii.gz"), "-o", str(tmp_path / name),
                     "--device", "cpu", "--progress", "none", *flag]) == 0
    plain = json.loads((tmp_path / "plain/shifted/report.json").read_text())["hu_calibration"]
    fixed = json.loads((tmp_path / "fixed/shifted/report.json").read_text())["hu_calibration"]
    assert abs(plain["shift_hu"] - 80) <= 8 and plain["corrected"] is False
    assert fixed["shift_hu"] == plain["shift_hu"] and fixed["corrected"] is True


def test_a_site_threshold_reads_scans_as_it_read_its_own_unless_told(tmp_path):
    from EmphysemaUADLib.checkpoint import load_checkpoint, save_checkpoint

    bundled = Detector.load(device="cpu")
    for corrected in (True, False):
        config = {**bundled.config,
                  "site_threshold": {"threshold": 0.3, "correct_hu": corrected}}
        path = save_checkpoint(tmp_path / f"site{corrected}.pt", bundled.model.state_dict(),
                               config)
        assert load_checkpoint(path).config["site_threshold"]["correct_hu"] is corrected
        assert Detector.load(path, device="cpu").correct_hu is corrected
        assert Detector.load(path, device="cpu", correct_hu=not corrected).correct_hu is \
            (not corrected)


@requires_shared
def test_the_real_scans_read_as_measured():
    hrct = read_ct(SHARED_DATA / "emphysema-hrct-slices/slices/subject11_top.nii.gz")
    check = check_hu(hrct)
    assert check.shifted and 70 <= check.shift_hu <= 90  # air -922, fat -24 HU
    for name in ("lung-pet-ct-dx/A0001_B.nii.gz", "lung-pet-ct-dx/A0001_L.nii.gz",
                 "chest-ct-dicom"):
        check = check_hu(read_ct(SHARED_DATA / name))
        assert not check.shifted and abs(check.air_hu + 1000) <= 15, name


def test_validate_refuses_correct_hu_with_earlier_results(tmp_path):
    from EmphysemaUADLib.errors import InputError
    from EmphysemaUADLib.validation import validate

    (tmp_path / "results").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("file,subject,pattern\na.nii.gz,s1,normal\n")
    for choice in (True, False):
        with pytest.raises(InputError, match="--no-correct-hu and --results"):
            validate(labels, tmp_path / "out", results=tmp_path / "results",
                     correct_hu=choice)
    assert not (tmp_path / "out").exists()


def test_validate_on_corrected_detect_results_measures_as_validate_does(phantom, tmp_path):
    from EmphysemaUADLib.validation import validate

    # single slices have no zones: validate --results segments the lungs again, and must do
    # so on the scale detect corrected to
    z = phantom.ct.shape[0] // 2
    for name in ("a", "b"):
        ct = shifted(phantom.ct, 80.0 if name == "a" else 84.0)
        one = dataclasses.replace(ct, array=ct.array[z:z + 1])
        write_phantom(dataclasses.replace(phantom, ct=one, lungs=phantom.lungs[z:z + 1],
                                          lesions=phantom.lesions[z:z + 1],
                                          zones=phantom.zones[z:z + 1],
                                          tissues=phantom.tissues[z:z + 1]),
                      tmp_path / f"{name}.nii.gz")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,subject,pattern\na.nii.gz,s1,normal\nb.nii.gz,s2,centrilobular\n")
    assert main(["detect", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "-o",
                 str(tmp_path / "detect"), "--correct-hu", "--device", "cpu",
                 "--progress", "none"]) == 0
    direct, _ = validate(labels, tmp_path / "direct", device="cpu", n_boot=0, correct_hu=True)
    reread, _ = validate(labels, tmp_path / "reread", results=tmp_path / "detect", n_boot=0)
    for one, two in zip(direct["cases"], reread["cases"]):
        assert one["hu_corrected"] and two["hu_corrected"]
        for key in ("laa950_percent", "laa910_percent", "perc15_hu"):
            assert one[key] == two[key], key
