"""A site's voxel threshold from its healthy CTs: the percentile arithmetic on hand-made score
sets, and `emphysema-uad site-threshold` end to end (the copy it writes carries the threshold
into `detect` and leaves a healthy scan of that site with the share of lung it promises)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from EmphysemaUADLib.checkpoint import load_checkpoint
from EmphysemaUADLib.cli import main
from EmphysemaUADLib.detection import Detector, default_model_path, detect_case
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.measurements import off_site_noise
from EmphysemaUADLib.progress import Progress
from EmphysemaUADLib.site_threshold import BINS, HealthyScores, SiteThreshold
from EmphysemaUADLib.volume_io import read_ct, write_volume


def test_the_threshold_leaves_the_percentiles_share_of_pooled_voxels_above_it():
    scores = HealthyScores()
    scores.add("quiet", np.full(99_000, 0.02, np.float32))
    scores.add("busy", np.concatenate([np.full(900, 0.02), np.full(100, 0.8)]))
    # 100 of 100 000 voxels (0.1 %) score 0.8: the 99.9th percentile is just above 0.02
    assert scores.threshold(99.9) == pytest.approx(0.02 + 1 / BINS)
    assert scores.voxels == 100_000
    assert scores.percent_above(scores.threshold(99.9)) == [0.0, 10.0]
    # at the 99.95th only 50 may lie above: the 100 at 0.8 are too many, so above them
    assert scores.threshold(99.95) == pytest.approx(0.8 + 1 / BINS)


def test_a_top_bin_holding_too_many_voxels_gives_the_highest_threshold():
    scores = HealthyScores()
    scores.add("saturated", np.ones(1000, np.float32))
    assert scores.threshold(99.9) == 1.0


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("healthy")
    for seed in (1, 2):
        phantom = make_phantom(seed=seed, shape=(10, 96, 96), spacing=(8.0, 3.5, 3.5))
        write_volume(phantom.ct.array, phantom.ct.geometry, folder / f"h{seed}.nii.gz")
    return folder


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_site_threshold_writes_a_model_copy_whose_threshold_detect_uses(healthy, tmp_path,
                                                                       capsys):
    out = tmp_path / "site" / "site_model.pt"
    code, captured = _run(["site-threshold", healthy, "-o", out, "--percentile", "99",
                           "--device", "cpu", "--progress", "none"], capsys)
    assert code == 0, captured.err
    config = json.loads(out.with_name("site_model.json").read_text())
    record = config["site_threshold"]
    assert record["scans"] == 2 and record["percentile"] == 99.0
    assert record["threshold"] == config["threshold"]
    assert "h1" not in json.dumps(record)  # no scan names in a model that may be shared
    assert f"threshold: {config['threshold']:g}" in captured.out
    # the weights are the bundled model's, unchanged
    bundled, copy = load_checkpoint(default_model_path()), load_checkpoint(out)
    assert all(np.array_equal(bundled.state_dict[k], copy.state_dict[k])
               for k in bundled.state_dict)
    assert copy.training_state is None
    detector = Detector.load(out, device="cpu")
    assert detector.threshold == config["threshold"]
    # a healthy scan it was set on has about the 1 % the 99th percentile leaves above the
    # threshold; detect counts those of them that lie at emphysema density (density.py)
    result = detect_case(read_ct(healthy / "h1.nii.gz"), detector, warn=False)
    table = {line.split()[0]: line.split()[1:] for line in captured.out.splitlines()[1:3]}
    assert 0.3 < np.mean([float(share) for share, _ in table.values()]) < 3.0
    lung = result.lungs > 0
    above = 100.0 * np.count_nonzero(result.anomaly[lung] >= detector.threshold) / lung.sum()
    assert above == pytest.approx(float(table["h1"][0]), abs=0.05)
    assert 0.0 < result.measurements.whole.emphysema_index_percent <= above + 0.05
    # the lung noise of each scan, and their range in the record for detect's check
    noise = [float(n) for _, n in table.values()]
    assert record["lung_noise_hu"] == [min(noise), max(noise)]


def test_an_unusable_scan_is_listed_and_the_others_still_set_the_threshold(healthy, tmp_path,
                                                                         capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.nii.gz").write_text("not an image")
    out = tmp_path / "site.pt"
    code, captured = _run(["site-threshold", healthy, bad, "-o", out, "--percentile", "99",
                           "--device", "cpu", "--progress", "none"], capsys)
    assert code == 1
    assert "broken" in captured.err and out.is_file()


@pytest.mark.parametrize("argv, words", [
    (["--percentile", "100"], "--percentile"),
    (["--percentile", "50"], "--percentile"),
    (["-o", "{tmp}/site.json"], "must not end in .json"),
    (["--percentile", "99.99"], "too few"),  # two small phantoms: not enough lung voxels
    (["-o", "{tmp}/m.pt", "--model", "{tmp}/m.pt"], "the model itself"),
])
def test_bad_settings_exit_2_in_one_line_and_write_nothing(argv, words, healthy, tmp_path,
                                                          capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" in argv:  # a model of its own to overwrite
        shutil.copy(default_model_path(), tmp_path / "m.pt")
        shutil.copy(default_model_path().with_suffix(".json"), tmp_path / "m.json")
    out = [] if "-o" in argv else ["-o", tmp_path / "site.pt"]
    code, captured = _run(["site-threshold", healthy, *out, *argv, "--device", "cpu",
                           "--progress", "none"], capsys)
    assert code == 2
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.json", "m.pt"] if "--model" in argv
                                                          else [])


def test_no_usable_scan_exits_2(tmp_path, capsys):
    body = np.full((6, 32, 32), -1000, np.int16)
    body[:, 4:28, 4:28] = 40  # soft tissue in air: no lung
    phantom = make_phantom(seed=1, shape=(6, 32, 32), spacing=(8.0, 3.5, 3.5))
    write_volume(body, phantom.ct.geometry, tmp_path / "nolung.nii.gz")
    code, captured = _run(["site-threshold", tmp_path / "nolung.nii.gz", "-o",
                           tmp_path / "out" / "site.pt", "--device", "cpu", "--progress",
                           "none"], capsys)
    assert code == 2 and "no healthy scan could be used" in captured.err
    assert not (tmp_path / "out").exists()


def test_noise_far_outside_the_sites_marks_another_kernel():
    site = {"lung_noise_hu": [10.0, 20.0]}
    assert off_site_noise(4.9, site) == (10.0, 20.0) and off_site_noise(41.0, site)
    assert off_site_noise(5.0, site) is None and off_site_noise(40.0, site) is None
    assert off_site_noise(None, site) is None and off_site_noise(80.0, None) is None
    scores = HealthyScores()
    for noise in (4.4, 41.5):  # one scan, a standard and a sharp kernel
        scores.add(f"{noise}", np.zeros(10), noise)
    assert SiteThreshold(0.5, 99.9, scores, False, []).mixed_noise
    scores.noise_hu = [19.3, 48.9]  # the healthy HRCT slices of one protocol
    assert not SiteThreshold(0.5, 99.9, scores, False, []).mixed_noise


def _warnings(detector, ct) -> list[str]:
    stream = io.StringIO()
    detect_case(ct, detector, progress=Progress("json", stream=stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [e["message"] for e in events if e.get("level") == "warning"]


def test_detect_warns_when_a_scan_is_noisier_than_the_sites_healthy_ones(healthy):
    detector = Detector.load(device="cpu")
    ct = read_ct(healthy / "h1.nii.gz")
    site = {"threshold": detector.threshold, "lung_noise_hu": [200.0, 220.0]}
    detector.config = {**detector.config, "site_threshold": site}
    assert any("another kernel or dose" in w for w in _warnings(detector, ct))
    assert detector.off_site_noise(30.0) == "200-220 HU"
    detector.threshold = 0.3  # the user's own threshold: the site's record does not apply
    assert not any("another kernel or dose" in w for w in _warnings(detector, ct))
