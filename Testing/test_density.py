"""What detection adds by density (density.py): lung air spaces more than 1 cm across are
bullae, found at the scan's own air level, and airway-sized air is not; each flag grows over
its lesion at emphysema density, up to REACH_MM, and nowhere without a flag; a flag on lung
above that density is not emphysema where the scan's air level is known; lung whose lobules
are at emphysema density is diffuse loss, a darker healthy lung and an airway's surroundings
are not."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_DATA
from EmphysemaUADLib.calibration import HuCheck
from EmphysemaUADLib.density import REACH_MM, LungDensity, air_level
from EmphysemaUADLib.training import scale_lung_density
from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.report import case_notes, report_dict, summary_row
from EmphysemaUADLib.volume_io import Geometry, Volume, read_ct

PIXEL = 0.8
SLICE = SHARED_DATA / "emphysema-hrct-slices" / "slices" / "subject5_top.nii.gz"


def lung_slice(air=-1000.0, shift=0.0, holes=((40, 40, 9.0), (40, 100, 3.0)), seed=0):
    """One slice: lung (-850 HU, noise 25 HU) with round air spaces (centre y, x, radius in
    mm) at `air` HU, all shifted by `shift`; returns (CT, lung labels)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-850.0, 25.0, (1, 80, 140)).astype(np.float32)
    yy, xx = np.mgrid[:80, :140]
    for cy, cx, radius in holes:
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius / PIXEL) ** 2
        hu[0][disk] = rng.normal(air, 10.0, int(disk.sum()))
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[0, 5:75, 5:135] = 1
    geometry = Geometry((PIXEL, PIXEL, 1.25), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return Volume(hu + np.float32(shift), geometry, "slice"), lungs


def test_an_air_space_wider_than_a_centimetre_is_a_bulla_an_airway_sized_one_is_not():
    ct, lungs = lung_slice()
    bullae = LungDensity(ct, lungs).bullae()
    assert bullae[0, 40, 40] and bullae[0, 40, 40 + int(8.0 / PIXEL)]  # 18 mm across
    assert not bullae[0, 40, 100]  # 6 mm across: an airway's size
    # all of it but a rim about the smoothing's width (the network flags walls and rims)
    assert 0.75 < bullae.sum() / (np.pi * (9.0 / PIXEL) ** 2) <= 1.0
    assert not bullae[lungs == 0].any()


def test_bullae_follow_the_scans_own_air_level():
    ct, lungs = lung_slice(shift=80.0)  # air outside the body reads -920 HU
    assert not LungDensity(ct, lungs).bullae().any()  # nominal air: none this dark
    check = HuCheck(-920.0, -20.0, 80.0)
    assert LungDensity(ct, lungs, air_level(check, corrected=False)).bullae()[0, 40, 40]
    assert air_level(check, corrected=True) == -1000.0  # the shift taken off: nominal air
    assert air_level(None, corrected=False) is None  # an ROI: no air to measure
    dark, lungs = lung_slice(air=-940.0)  # dark lung, not air: no bulla
    assert not LungDensity(dark, lungs).bullae().any()


def test_detection_counts_bullae_as_emphysema():
    phantom = make_phantom(seed=3, emphysema="none", shape=(24, 96, 96),
                           spacing=(4.0, 3.5, 3.5))
    ct, lungs = phantom.ct, phantom.lungs
    z, y, x = (int(np.median(a)) for a in np.nonzero(lungs == 1))
    zz, yy, xx = np.ogrid[:ct.shape[0], :ct.shape[1], :ct.shape[2]]
    ball = (((zz - z) * 4.0) ** 2 + ((yy - y) * 3.5) ** 2 + ((xx - x) * 3.5) ** 2 <= 12.0 ** 2)
    ball &= lungs == 1
    hu = ct.array.astype(np.float32)
    hu[ball] = -1000.0
    detector = Detector.load(None, "cpu")
    result = detect_case(Volume(hu, ct.geometry, "bulla"), detector, lungs=lungs, warn=False)
    assert (result.anomaly[ball] == 1.0).mean() > 0.9
    assert result.emphysema[ball].mean() > 0.9
    ball_ml = np.count_nonzero(ball) * ct.geometry.voxel_ml
    assert 0.9 * ball_ml < result.bullae_ml <= ball_ml + 0.01  # mL to 2 decimals
    report = report_dict(result, detector, "bulla")
    assert report["bullae_ml"] == result.bullae_ml
    assert any(note.startswith("Bullae") and f"{result.bullae_ml:.1f} mL" in note
               for note in report["notes"])  # the overlay's line, and Slicer's status line
    assert summary_row("bulla", result)["bullae_ml"] == result.bullae_ml  # the worklist


def test_lobules_at_emphysema_density_are_diffuse_loss_a_darker_lung_and_airways_are_not():
    """Lung with vessels, its right half darkened evenly (no edges inside it) to a quarter
    of its tissue (about -967 HU): diffuse loss. The left half darkened as by a deep inspiration
    (two thirds of its tissue, about -915 HU) is not, nor is lung around an airway-sized
    lumen of air."""
    rng = np.random.default_rng(2)
    hu = rng.normal(-870.0, 30.0, (1, 100, 160)).astype(np.float32)
    hu[0, 10::40, :] = -300.0  # vessels 32 mm apart
    yy, xx = np.mgrid[:100, :160]
    lumen = (yy - 50) ** 2 + (xx - 40) ** 2 <= (3.0 / PIXEL) ** 2  # 6 mm across
    hu[0][lumen] = rng.normal(-1000.0, 10.0, int(lumen.sum()))
    hu[0, :, :80] = scale_lung_density(hu[0, :, :80], 2 / 3)
    hu[0, :, 80:] = scale_lung_density(hu[0, :, 80:], 1 / 4)
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[0, 5:95, 5:155] = 1
    geometry = Geometry((PIXEL, PIXEL, 1.25), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    diffuse = LungDensity(Volume(hu, geometry, "slice"), lungs, air_hu=-1000.0).diffuse_loss()
    # the evenly darkened half, a centimetre and more from the vessels (near them, their
    # tissue keeps a lobule's average above -950 HU)
    assert diffuse[0, 23:38, 95:145].mean() > 0.9 and diffuse[0, 63:78, 95:145].mean() > 0.9
    assert not diffuse[0, :, :75].any()  # darker healthy lung, and the airway's surroundings
    assert not diffuse[lungs == 0].any()
    # on a scale shifted by +80 HU the same lung is found at that scan's air level
    shifted = Volume(hu + np.float32(80.0), geometry, "slice")
    assert (LungDensity(shifted, lungs, air_hu=-920.0).diffuse_loss() == diffuse).mean() > 0.99


def test_noise_that_does_not_run_from_slice_to_slice_is_not_diffuse_loss():
    """Lung at -910 HU with smooth, lobule-sized noise (40 HU after smoothing) drawn anew on
    every 1.25 mm slice, as a smooth kernel's noise is: about one voxel in ten lies below
    -950 HU on its own slice's lobular average, almost none on the 3-D one."""
    from scipy import ndimage as ndi
    rng = np.random.default_rng(4)
    noise = ndi.gaussian_filter(rng.standard_normal((12, 80, 80)), (0, 5.0, 5.0))
    hu = (-910.0 + 40.0 * noise / noise.std()).astype(np.float32)
    lungs = np.ones(hu.shape, np.uint8)
    geometry = Geometry((PIXEL, PIXEL, 1.25), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert (hu < -950).mean() > 0.1
    diffuse = LungDensity(Volume(hu, geometry, "noisy"), lungs, air_hu=-1000.0).diffuse_loss()
    assert diffuse[3:-3].mean() < 0.01  # away from the volume's ends


def test_detection_counts_diffuse_loss_as_emphysema():
    """A phantom lung with one lung darkened evenly to a third of its tissue: the network
    barely flags an even darkening; detection counts it by density and says so."""
    phantom = make_phantom(seed=3, emphysema="none", shape=(24, 96, 96),
                           spacing=(4.0, 3.5, 3.5))
    hu = phantom.ct.array.astype(np.float32)
    right = phantom.lungs == 1
    hu[right] = scale_lung_density(hu[right], 1 / 3)
    detector = Detector.load(None, "cpu")
    result = detect_case(Volume(hu, phantom.ct.geometry, "diffuse"), detector,
                         lungs=phantom.lungs, warn=False)
    rows = {r.region: r for r in result.measurements.rows}
    assert rows["right lung"].emphysema_index_percent > 25.0
    assert rows["left lung"].emphysema_index_percent < 0.5
    assert result.diffuse_ml > 0.5 * rows["right lung"].volume_ml * 0.25
    report = report_dict(result, detector, "diffuse")
    assert report["diffuse_ml"] == result.diffuse_ml
    assert any(note.startswith("Diffuse loss") and f"{result.diffuse_ml:.1f} mL" in note
               for note in report["notes"])
    assert summary_row("diffuse", result)["diffuse_ml"] == result.diffuse_ml
    result.diffuse_ml = 0.04  # a few voxels' worth: no line
    assert not any(note.startswith("Diffuse loss") for note in case_notes(result, detector))


@pytest.mark.skipif(not SLICE.is_file(), reason=f"{SLICE} not found (../shared/data)")
def test_a_real_bulla_is_counted():
    """The 4 cm bulla of a labelled paraseptal slice (severity 3), which the network leaves
    unflagged inside, on the slices' own shifted HU scale."""
    result = detect_case(read_ct(SLICE), Detector.load(None, "cpu"), warn=False)
    assert result.measurements.whole.emphysema_index_percent > 15.0
    assert result.measurements.whole.stage == "Moderate"


def test_a_flag_grows_over_its_lesion_at_emphysema_density_and_no_further():
    """A flagged core in a dark (-975 HU) patch grows over the patch, up to REACH_MM; a dark
    patch without a flag stays out, and so does lung at -900 HU (dark, not emphysema): its
    flag is dropped where the scan's air level was measured, kept (alone) where not."""
    rng = np.random.default_rng(1)
    hu = rng.normal(-850.0, 15.0, (1, 80, 140)).astype(np.float32)
    yy, xx = np.mgrid[:80, :140]
    lesion = (yy - 40) ** 2 + (xx - 30) ** 2 <= (4.0 / PIXEL) ** 2  # 8 mm across
    band = (abs(yy - 40) <= 2) & (xx >= 60) & (xx < 130)  # a long dark band
    alone = (yy - 15) ** 2 + (xx - 100) ** 2 <= (4.0 / PIXEL) ** 2
    hu[0][lesion | band | alone] = -975.0
    hu[0][60:75, 20:50] = -900.0
    lungs = np.ones(hu.shape, np.uint8)
    geometry = Geometry((PIXEL, PIXEL, 1.25), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = Volume(hu, geometry, "slice")
    flags = np.zeros(hu.shape, bool)
    flags[0, 39:42, 29:32] = True  # the lesion's core
    flags[0, 39:42, 60:63] = True  # the band's first pixels
    flags[0, 65, 30] = True  # one pixel of the dark lung
    grown = LungDensity(ct, lungs, air_hu=-1000.0).extent(flags)
    inner = (yy - 40) ** 2 + (xx - 30) ** 2 <= (3.0 / PIXEL) ** 2  # less the smoothed rim
    assert grown[0][inner].all()
    reach = np.flatnonzero(grown[0, 40])
    assert reach.max() <= 62 + REACH_MM / PIXEL + 1  # along the band: REACH_MM at most
    assert not grown[0][alone].any()
    assert not grown[0, 60:75, 20:50].any()  # -900 HU: tissue, not a hole
    unmeasured = LungDensity(ct, lungs).extent(flags)  # an ROI: nothing taken away
    assert unmeasured[0, 60:75, 20:50].sum() == 1
    assert unmeasured[grown].all()
    # the same on a scale shifted by +80 HU, at that scan's air level
    shifted = Volume(hu + np.float32(80.0), geometry, "slice")
    assert not LungDensity(shifted, lungs, air_hu=-1000.0).extent(flags)[0][inner].any()
    np.testing.assert_array_equal(LungDensity(shifted, lungs, air_hu=-920.0).extent(flags),
                                  grown)
