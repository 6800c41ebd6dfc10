"""Classical lung segmentation: phantoms with known truth, the real CT and edits of it,
and the TotalSegmentator example's lobes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import SHARED_DATA, requires_shared
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.lungs import LEFT, RIGHT, segment_lungs
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.volume_io import Geometry, Volume, read_ct, read_labels

# adult-sized phantom: 96 x 4 mm covers a whole chest in-plane, 64 x 5 mm the lungs
PHANTOM = dict(shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def physical_x(mask: np.ndarray, geometry: Geometry) -> float:
    """Mean physical x (LPS: larger is further to the patient's left) of a mask's voxels."""
    ijk = np.argwhere(mask)[:, ::-1] * np.asarray(geometry.spacing)
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return float(geometry.origin[0] + (ijk @ direction[0]).mean())


@pytest.fixture(scope="module")
def healthy():
    return make_phantom(seed=1, noise=20.0, kernel="smooth", emphysema="none", **PHANTOM)


# --- phantoms ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, emphysema, morphology, kernel, noise", [
    (1, "none", "mixed", "smooth", 20.0),
    (2, "severe", "bullous", "smooth", 20.0),
    (3, "severe", "mixed", "sharp", 40.0),
])
def test_phantom_matches_truth(seed, emphysema, morphology, kernel, noise):
    p = make_phantom(seed=seed, noise=noise, kernel=kernel, emphysema=emphysema,
                     morphology=morphology, **PHANTOM)
    lungs = segment_lungs(p.ct)
    assert lungs.dtype == np.uint8 and lungs.shape == p.ct.shape
    assert set(np.unique(lungs)) <= {0, RIGHT, LEFT}
    assert dice(lungs > 0, p.lungs > 0) >= 0.97
    for side in (RIGHT, LEFT):
        assert dice(lungs == side, p.lungs == side) >= 0.93
    if emphysema != "none":  # the emphysema lies inside the lungs found
        assert np.count_nonzero(lungs[p.lesions > 0]) >= 0.97 * np.count_nonzero(p.lesions)


def test_orientation_comes_from_the_direction_matrix(healthy):
    """The same voxels stored flipped (direction diag(-1, -1, 1)) or transposed (x as the
    slowest axis) give the same labels: right and left come from physical coordinates."""
    ct, g = healthy.ct.array, healthy.ct.geometry
    expected = segment_lungs(healthy.ct)
    assert physical_x(expected == RIGHT, g) < physical_x(expected == LEFT, g)
    nz, ny, nx = ct.shape
    origin = (g.origin[0] + (nx - 1) * g.spacing[0], g.origin[1] + (ny - 1) * g.spacing[1],
              g.origin[2])
    flipped = Geometry(g.spacing, origin, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    result = segment_lungs(Volume(ct[:, ::-1, ::-1].copy(), flipped))
    np.testing.assert_array_equal(result, expected[:, ::-1, ::-1])
    # array axes (x, y, z): ITK index i runs along z, k along x
    sagittal = Geometry((g.spacing[2], g.spacing[1], g.spacing[0]), g.origin,
                        (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    result = segment_lungs(Volume(np.ascontiguousarray(ct.transpose(2, 1, 0)), sagittal))
    np.testing.assert_array_equal(result, expected.transpose(2, 1, 0))


def test_phantom_single_slice_and_partial_coverage(healthy):
    truth = healthy.lungs
    rows = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = int(rows[len(rows) // 2])
    for part in (slice(mid, mid + 1), slice(rows[0], rows[0] + 12),
                 slice(rows[-1] - 11, rows[-1] + 1)):  # one slice, bases, apices
        ct = Volume(healthy.ct.array[part].copy(), healthy.ct.geometry)
        lungs = segment_lungs(ct)
        assert dice(lungs > 0, truth[part] > 0) >= 0.93, part
        for side in (RIGHT, LEFT):
            assert dice(lungs == side, truth[part] == side) >= 0.85, (part, side)


def test_field_of_view_padding_is_outside(healthy):
    ct = healthy.ct.array.copy()
    _, ny, nx = ct.shape
    y, x = np.ogrid[:ny, :nx]
    ct[:, (y - ny / 2) ** 2 + (x - nx / 2) ** 2 > (0.5 * nx) ** 2] = -3024.0
    lungs = segment_lungs(Volume(ct, healthy.ct.geometry))
    assert dice(lungs > 0, healthy.lungs > 0) >= 0.97


def test_a_field_of_view_that_cuts_the_lungs(healthy):
    """A field narrower than the chest (a targeted or cardiac reconstruction): the lungs'
    sections that reach the image border or the scan-field padding are lung, not outside air
    (they were lost: Dice 0.14-0.17)."""
    truth = healthy.lungs
    cols = np.flatnonzero(truth.any(axis=(0, 1)))
    rows = np.flatnonzero(truth.any(axis=(0, 2)))
    cut = (slice(None), slice(rows[0] + 4, None), slice(cols[0] + 5, cols[-1] - 5))
    lungs = segment_lungs(Volume(healthy.ct.array[cut].copy(), healthy.ct.geometry))
    circle = healthy.ct.array.copy()
    _, ny, nx = circle.shape
    y, x = np.ogrid[:ny, :nx]
    circle[:, (y - ny / 2) ** 2 + (x - (cols[0] + cols[-1]) / 2) ** 2
           > ((cols[-1] - cols[0]) / 2 - 4) ** 2] = -3024.0
    in_circle = segment_lungs(Volume(circle, healthy.ct.geometry))
    for found, expected in ((lungs, truth[cut]), (in_circle, np.where(circle > -1500, truth, 0))):
        assert dice(found > 0, expected > 0) >= 0.95
        for side in (RIGHT, LEFT):
            assert dice(found == side, expected == side) >= 0.93, side


def test_a_field_of_view_that_cuts_lungs_with_severe_emphysema():
    """The cut sections join the lungs by density on the coarse grid: a third of the lung
    below -950 HU (bullae) still joins."""
    p = make_phantom(seed=2, noise=20.0, kernel="smooth", emphysema="severe",
                     morphology="bullous", **PHANTOM)
    cols = np.flatnonzero(p.lungs.any(axis=(0, 1)))
    cut = (slice(None), slice(None), slice(cols[0] + 5, cols[-1] - 5))
    lungs = segment_lungs(Volume(p.ct.array[cut].copy(), p.ct.geometry))
    truth = p.lungs[cut] > 0
    assert np.mean(p.ct.array[cut][truth] < -950) > 0.3
    assert dice(lungs > 0, truth) >= 0.93


def test_no_lungs_in_a_water_cylinder():
    ct = np.full((4, 64, 64), -1000.0, np.float32)
    y, x = np.ogrid[:64, :64]
    ct[:, (y - 32) ** 2 + (x - 32) ** 2 < 28 ** 2] = 0.0
    geometry = Geometry((2.0, 2.0, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lungs = segment_lungs(Volume(ct, geometry))
    assert lungs.shape == ct.shape and not lungs.any()


def test_refuses_a_volume_that_is_not_3d():
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="3-D"):
        segment_lungs(Volume(np.zeros((8, 8), np.float32), geometry))


# --- the real CT ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    ct = read_ct(SHARED_DATA / "chest-ct-dicom")
    return ct, segment_lungs(ct)


@pytest.fixture(scope="module")
def small(real):
    """The real CT at 3.9 x 3.9 x 4 mm (block means), with its lungs: edits run fast."""
    ct = real[0]
    nz, ny, nx = (n - n % f for n, f in zip(ct.shape, (2, 4, 4)))
    array = ct.array[:nz, :ny, :nx].reshape(nz // 2, 2, ny // 4, 4, nx // 4, 4)
    array = array.mean(axis=(1, 3, 5), dtype=np.float32)
    g = ct.geometry
    geometry = Geometry((g.spacing[0] * 4, g.spacing[1] * 4, g.spacing[2] * 2), g.origin,
                        g.direction)
    small_ct = Volume(array, geometry)
    return small_ct, segment_lungs(small_ct)


@requires_shared
def test_real_ct(real):
    ct, lungs = real
    ml = ct.geometry.voxel_ml
    right, left = (np.count_nonzero(lungs == side) * ml for side in (RIGHT, LEFT))
    assert 3000 <= right + left <= 7000 and right > 1000 and left > 1000
    assert physical_x(lungs == RIGHT, ct.geometry) < physical_x(lungs == LEFT, ct.geometry)
    # the top slices (physically) hold the neck and the trachea, above the apices: no lung
    direction = np.asarray(ct.geometry.direction).reshape(3, 3)
    order = np.arange(ct.shape[0])[::-1] if direction[2, 2] > 0 else np.arange(ct.shape[0])
    with_lung = order[lungs[order].any(axis=(1, 2))]
    above = order[:np.flatnonzero(order == with_lung[0])[0]]
    assert len(above) >= 5 and not lungs[above].any()
    # ... and the trachea is there: air inside the body near the mid-line in those slices;
    # it stays unlabelled down to 2 cm below the apices
    for z in (above[0], above[-1], with_lung[10]):
        air, n = ndi.label(ct.array[z] < -900)
        inside = np.setdiff1d(np.arange(1, n + 1), np.concatenate(
            [air[0], air[-1], air[:, 0], air[:, -1]]))
        body_x = np.flatnonzero((ct.array[z] > -500).any(axis=0))
        centre = (body_x[0] + body_x[-1]) / 2
        sx, sy = ct.geometry.spacing[:2]
        central = [i for i in inside
                   if abs(np.argwhere(air == i)[:, 1].mean() - centre) * sx < 20
                   and np.count_nonzero(air == i) * sx * sy > 100]
        assert central, z  # a trachea section of more than 1 cm2 exists here ...
        for i in central:  # ... and is not lung
            assert not lungs[z][air == i].any(), z


@requires_shared
def test_real_ct_single_slice_bases_and_apices(small):
    ct, ref = small
    g = ct.geometry
    for part in (slice(10, 20), slice(20, 21), slice(35, 36), slice(50, 70)):
        lungs = segment_lungs(Volume(ct.array[part].copy(), g))
        assert dice(lungs > 0, ref[part] > 0) >= 0.95, part
        for side in (RIGHT, LEFT):
            assert dice(lungs == side, ref[part] == side) >= 0.9, (part, side)
    apices = segment_lungs(Volume(ct.array[50:].copy(), g))
    assert not apices[-3:].any()  # above the apices: trachea only


@requires_shared
def test_real_ct_in_a_300_mm_field_of_view(small):
    """The thorax CT cut to a 300 mm field: both lungs reach its border and stay lung."""
    ct, ref = small
    n = int(round(300 / ct.geometry.spacing[0]))
    y0, x0 = ((size - n) // 2 for size in ct.shape[1:])
    cut = (slice(None), slice(y0 + 5, y0 + 5 + n), slice(x0, x0 + n))
    assert (ref[cut][:, :, 0] == RIGHT).any() and (ref[cut][:, :, -1] == LEFT).any()
    lungs = segment_lungs(Volume(ct.array[cut].copy(), ct.geometry))
    assert dice(lungs > 0, ref[cut] > 0) >= 0.95
    for side in (RIGHT, LEFT):
        assert dice(lungs == side, ref[cut] == side) >= 0.93, side


@requires_shared
def test_real_ct_severe_emphysema_stays_lung(small):
    ct, ref = small
    rng = np.random.default_rng(0)
    # severe emphysema: all parenchyma of the right lung, then of both lungs, near -985 HU
    for sides in ((RIGHT,), (RIGHT, LEFT)):
        edited = ct.array.copy()
        m = np.isin(ref, sides) & (edited < -700)
        edited[m] = -985.0 + rng.normal(0.0, 20.0, m.sum())
        lungs = segment_lungs(Volume(edited, ct.geometry))
        for side in (RIGHT, LEFT):
            assert dice(lungs == side, ref == side) >= 0.97, (sides, side)


@requires_shared
def test_real_ct_bulla_stays_lung(real):
    """A 5 cm bulla at the lateral pleura of the right lung, behind a 4 mm wall, at full
    resolution (slices 50-89 only, for speed)."""
    ct, ref = real
    part = slice(50, 90)
    array, ref = ct.array[part].copy(), ref[part]
    z0, y0 = 20, 256
    x0 = np.flatnonzero(ref[z0, y0] == RIGHT).min() + 8
    sz, sy, sx = ct.geometry.spacing_zyx
    zz, yy, xx = np.ogrid[:array.shape[0], :array.shape[1], :array.shape[2]]
    r = np.sqrt(((zz - z0) * sz) ** 2 + ((yy - y0) * sy) ** 2 + ((xx - x0) * sx) ** 2)
    array[(r >= 25) & (r < 29)] = 20.0
    bulla = r < 25
    array[bulla] = -1000.0 + np.random.default_rng(0).normal(0.0, 10.0, bulla.sum())
    lungs = segment_lungs(Volume(array, ct.geometry))
    assert np.mean(lungs[bulla] == RIGHT) >= 0.95
    assert dice(lungs == LEFT, ref == LEFT) >= 0.98


@requires_shared
def test_real_ct_juxtapleural_nodule_is_mostly_lung(real):
    """A 16 mm nodule on the lateral pleura of the left lung: its half inside the lung is
    mostly kept (closing), the chest wall is not taken (slices 50-89 only, for speed)."""
    ct, ref = real
    part = slice(50, 90)
    array, ref = ct.array[part].copy(), ref[part]
    z0, y0 = 10, 300
    x0 = np.flatnonzero(ref[z0, y0] == LEFT).max()
    sz, sy, sx = ct.geometry.spacing_zyx
    zz, yy, xx = np.ogrid[:array.shape[0], :array.shape[1], :array.shape[2]]
    nodule = ((zz - z0) * sz) ** 2 + ((yy - y0) * sy) ** 2 + ((xx - x0) * sx) ** 2 < 8 ** 2
    array[nodule] = 30.0
    lungs = segment_lungs(Volume(array, ct.geometry))
    assert np.mean(lungs[nodule & (ref == LEFT)] == LEFT) >= 0.5
    assert np.count_nonzero(lungs == LEFT) <= 1.01 * np.count_nonzero(ref == LEFT)


@requires_shared
def test_real_ct_noise_and_sharp_kernel(small):
    ct, ref = small
    rng = np.random.default_rng(1)
    a = ct.array
    sharp = a + 1.0 * (a - ndi.gaussian_filter(a, (0, 1, 1))) + rng.normal(0, 60, a.shape)
    lungs = segment_lungs(Volume(sharp.astype(np.float32), ct.geometry))
    for side in (RIGHT, LEFT):
        assert dice(lungs == side, ref == side) >= 0.96


@requires_shared
def test_totalsegmentator_lobes():
    folder = SHARED_DATA / "totalsegmentator-example"
    ct = read_ct(folder / "example_ct.nii.gz")
    seg = read_labels(folder / "example_seg.nii.gz").array
    # example_seg.nii.gz holds only the CT's top 30 slices although its header origin equals
    # the CT's: align by index, seg slice i <-> CT slice nz_ct - nz_seg + i
    offset = ct.shape[0] - seg.shape[0]
    lungs = segment_lungs(ct)
    assert not lungs[:offset].any()
    lungs = lungs[offset:]
    truth = np.where(np.isin(seg, (12, 13, 14)), RIGHT, np.where(np.isin(seg, (10, 11)), LEFT, 0))
    rows = truth.any(axis=(1, 2))
    assert dice(lungs[rows] > 0, truth[rows] > 0) >= 0.90
    for side in (RIGHT, LEFT):
        assert dice(lungs[rows] == side, truth[rows] == side) >= 0.90
