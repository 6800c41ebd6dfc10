"""CT input: formats, exact geometry round trips, DICOM series and every refusal."""
from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.progress import Progress
from EmphysemaUADLib.volume_io import Geometry, read_ct, read_labels, write_volume
from conftest import SHARED_DATA, requires_shared


def ct_like(shape=(6, 40, 48), seed=0) -> np.ndarray:
    """Air around a soft-tissue body with a lung-density core: passes the HU check."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    r = np.hypot((y - shape[1] / 2) / (shape[1] * 0.4), (x - shape[2] / 2) / (shape[2] * 0.4))
    ct = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 10, shape)
    ct[r < 0.6] = -850 + rng.normal(0, 20, ct[r < 0.6].shape)
    return ct.astype(np.int16)


OBLIQUE = Geometry((0.7, 0.8, 2.5), (-120.25, 33.5, -401.125),
                   tuple(sitk.VersorTransform((0.1, 0.2, 0.3), 0.4).GetMatrix()))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_values_and_geometry(tmp_path, suffix):
    array = ct_like()
    path = write_volume(array, OBLIQUE, tmp_path / f"ct{suffix}")
    ct = read_ct(path)
    np.testing.assert_array_equal(ct.array, array)
    np.testing.assert_allclose(ct.geometry.spacing, OBLIQUE.spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ct.geometry.origin, OBLIQUE.origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ct.geometry.direction, OBLIQUE.direction, atol=1e-6)
    # written back unchanged: a second round trip is the identity
    again = read_ct(write_volume(ct.array, ct.geometry, tmp_path / f"again{suffix}"))
    if suffix.startswith(".nii"):  # NIfTI stores the rotation as float32 quaternions
        np.testing.assert_allclose(again.geometry.direction, ct.geometry.direction, atol=1e-6)
        assert again.geometry.spacing == ct.geometry.spacing
    else:
        assert again.geometry == ct.geometry
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_two_d_image_is_a_one_slice_volume(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(ct_like()[0]), str(tmp_path / "slice.nii.gz"))
    ct = read_ct(tmp_path / "slice.nii.gz")
    assert ct.shape == (1, 40, 48)


def test_padding_below_minus_2000_is_valid_ct(tmp_path):
    array = ct_like()
    array[:, :5, :] = -3024
    assert read_ct(write_volume(array, OBLIQUE, tmp_path / "padded.nrrd")).array.min() == -3024


def write_dicom_series(folder, array, modality="CT", series_uid="1.2.3.4", description="",
                       spacing=(0.8, 0.8, 2.0)):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        img = sitk.GetImageFromArray(array[k].astype(np.int16))
        img.SetSpacing(spacing[:2])
        for tag, value in {
            "0008|0060": modality, "0020|000e": series_uid, "0008|103e": description,
            "0020|000d": "1.2.3", "0020|0032": f"-100\\-80\\{k * spacing[2]:.3f}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
            "0018|0050": str(spacing[2]), "0008|0018": f"{series_uid}.{k + 1}",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}-{k:03d}.dcm"))
        writer.Execute(img)


def test_dicom_folder_picks_the_largest_ct_series(tmp_path):
    array = ct_like(shape=(7, 40, 48))
    write_dicom_series(tmp_path / "study" / "a", array, series_uid="1.2.3.4.1",
                       description="thin")
    write_dicom_series(tmp_path / "study" / "b", array[:3], series_uid="1.2.3.4.2")
    write_dicom_series(tmp_path / "study" / "b", array, modality="MR", series_uid="1.2.3.4.3")
    notes = []
    progress = Progress("none")
    progress.log = lambda message, level="info": notes.append(message)
    ct = read_ct(tmp_path / "study", progress)
    assert ct.shape == (7, 40, 48)
    np.testing.assert_array_equal(ct.array, array)
    np.testing.assert_allclose(ct.geometry.spacing, (0.8, 0.8, 2.0), atol=1e-4)
    assert len(notes) == 1 and "1.2.3.4.1" in notes[0] and "3 DICOM series" in notes[0]


def test_of_equally_large_ct_series_the_smoothest_is_read(tmp_path):
    """One acquisition reconstructed with a soft and a sharp kernel: the soft one is read,
    whatever the series' UIDs (the model reads smooth kernels most reliably)."""
    rng = np.random.default_rng(3)
    y, x = np.indices((64, 64))
    lung = np.hypot(y - 32, x - 32) < 24
    soft = np.where(lung, -850.0, 40.0) + rng.normal(0, 8, (7, 64, 64))
    sharp = soft + np.where(lung, rng.normal(0, 60, soft.shape), 0.0)
    write_dicom_series(tmp_path / "study", soft, series_uid="1.2.3.4.1", description="soft")
    write_dicom_series(tmp_path / "study", sharp, series_uid="1.2.3.4.2", description="sharp")
    notes = []
    progress = Progress("none")
    progress.log = lambda message, level="info": notes.append(message)
    ct = read_ct(tmp_path / "study", progress)
    np.testing.assert_array_equal(ct.array, soft.astype(np.int16))
    assert len(notes) == 1 and "1.2.3.4.1" in notes[0] and "the smoothest of 2" in notes[0]
    assert "1.2.3.4.2 (sharp)" in notes[0]


def test_dicom_folder_without_ct_is_refused(tmp_path):
    write_dicom_series(tmp_path / "mr", ct_like(), modality="MR")
    with pytest.raises(InputError, match="no CT series"):
        read_ct(tmp_path / "mr")


@requires_shared
def test_real_dicom_series():
    ct = read_ct(SHARED_DATA / "chest-ct-dicom")
    assert ct.shape == (141, 512, 512)
    np.testing.assert_allclose(ct.geometry.spacing, (0.9765625, 0.9765625, 2.0))
    assert ct.array.min() == -1024


def refusal(tmp_path, name, array=None, geometry=OBLIQUE, raw: bytes | None = None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        sitk.WriteImage(geometry.apply(sitk.GetImageFromArray(array)), str(path))
    with pytest.raises(InputError) as info:
        read_ct(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_refusals(tmp_path):
    ok = ct_like()
    with pytest.raises(InputError, match="no such file"):
        read_ct(tmp_path / "absent.nii.gz")
    assert "not a supported" in refusal(tmp_path, "text.nii.gz", raw=b"not an image\n")
    whole = tmp_path / "whole.nii"
    sitk.WriteImage(sitk.GetImageFromArray(ok), str(whole))
    data = whole.read_bytes()
    assert "truncated" in refusal(tmp_path, "truncated.nii", raw=data[: len(data) // 2])
    assert "truncated" in refusal(tmp_path, "truncated.nii.gz",
                                    raw=gzip.compress(data)[: len(data) // 8])
    assert "same value" in refusal(tmp_path, "constant.nrrd", np.full((4, 8, 8), -1000.0))
    nan = ok.astype(np.float32)
    nan[2, 3, 4] = np.nan
    assert "NaN" in refusal(tmp_path, "nan.nrrd", nan)
    inf = ok.astype(np.float32)
    inf[0, 0, 0] = np.inf
    assert "NaN or infinite" in refusal(tmp_path, "inf.mha", inf)
    volume = sitk.GetImageFromArray(ok)
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / "four_d.nii.gz"))
    with pytest.raises(InputError, match="4-D"):
        read_ct(tmp_path / "four_d.nii.gz")
    rgb = sitk.Compose(*[sitk.GetImageFromArray(ok[0])] * 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components"):
        read_ct(tmp_path / "rgb.nrrd")
    header = (tmp_path / "good.mha")
    sitk.WriteImage(sitk.GetImageFromArray(ok), str(header))
    zero = header.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 0 1")
    assert "zero or negative" in refusal(tmp_path, "zero_spacing.mha", raw=zero)


@pytest.mark.parametrize("values", ["raw", "mr", "unit"])
def test_not_ct_in_hu_is_refused(tmp_path, values):
    ok = ct_like().astype(np.float32)
    array = {"raw": ok + 1024, "mr": np.clip(ok + 1000, 0, None) * 0.4,
             "unit": (ok + 1000) / 1400}[values]
    assert "does not look like CT in Hounsfield units" in refusal(tmp_path, "x.nrrd", array)


@requires_shared
def test_mr_example_is_refused_by_the_cli():
    mr = SHARED_DATA / "totalsegmentator-example" / "example_mr_sm.nii.gz"
    out = subprocess.run([sys.executable, "-m", "EmphysemaUADLib", "lungs", str(mr),
                          "--output", "/tmp/never-written.nii.gz"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "does not look like CT in Hounsfield units" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_read_labels_keeps_integers(tmp_path):
    labels = np.zeros((3, 5, 7), np.uint8)
    labels[1, 2, 3] = 14
    back = read_labels(write_volume(labels, OBLIQUE, tmp_path / "lobes.nii.gz"))
    np.testing.assert_array_equal(back.array, labels)
    with pytest.raises(InputError, match="whole-number"):
        read_labels(write_volume(labels + 0.5, OBLIQUE, tmp_path / "frac.nrrd"))


def test_failed_write_leaves_existing_file(tmp_path):
    target = write_volume(ct_like(), OBLIQUE, tmp_path / "keep.nii.gz")
    before = target.read_bytes()
    with pytest.raises(Exception):
        write_volume(np.zeros((2, 2, 2, 2, 2, 2)), OBLIQUE, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]
