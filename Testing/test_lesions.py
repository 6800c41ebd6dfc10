"""Synthetic emphysema lesions: placement, density, size, amount, zones, determinism."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.lesions import (CLINICAL, MORPHOLOGIES, REMAINING, random_training_lesions,
                                     synthesize_lesions, tissue_density)

ALL = MORPHOLOGIES + ("mixed",)
SPACING_2D = (0.8, 0.8)
SPACING_3D = (4.0, 1.6, 1.6)


def _lungs_in(shape):
    """Two ellipsoidal lungs (in-plane ~65 x 150 mm each), as a boolean mask."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    y, x = grids[-2], grids[-1]
    ny, nx = shape[-2:]
    ellipse = [((y - ny / 2) / (0.4 * ny)) ** 2 + ((x - c * nx) / (0.17 * nx)) ** 2
               for c in (0.3, 0.7)]
    if len(shape) == 3:
        zz = ((grids[0] - shape[0] / 2) / (0.45 * shape[0])) ** 2
        ellipse = [e + zz for e in ellipse]
    return (ellipse[0] < 1) | (ellipse[1] < 1)


def _chest(shape, seed=0):
    """Lung at -860 HU with fine texture, bright vessels (-50 HU) and an airway (lumen -990 HU,
    wall -300 HU) inside the lung mask; soft tissue (40 HU) around."""
    rng = np.random.default_rng(seed)
    lungs = _lungs_in(shape)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 1.0)
    hu = np.where(lungs, -860.0 + 15.0 * texture / texture.std(), 40.0).astype(np.float32)
    y, x = np.ogrid[:shape[-2], :shape[-1]]
    vessels = np.zeros(shape[-2:], dtype=bool)
    for cy, cx in rng.integers(0, shape[-1], (30, 2)):
        vessels |= (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(2, 4) ** 2
    cy, cx = shape[-2] // 2, int(0.3 * shape[-1])
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    airway_wall, airway = r2 < 8 ** 2, r2 < 5 ** 2
    for mask, value in ((vessels, -50.0), (airway_wall, -300.0), (airway, -990.0)):
        hu[np.broadcast_to(mask, shape) & lungs] = value
    return hu, lungs.astype(np.uint8), np.broadcast_to(airway, shape) & lungs


@pytest.fixture(scope="module")
def chest2d():
    return _chest((256, 256))


@pytest.fixture(scope="module")
def chest3d():
    return _chest((40, 112, 112))


def _diameters_mm(label, spacing):
    """Equivalent diameters (mm) of the label's connected components."""
    components, n = ndimage.label(label)
    sizes = np.bincount(components.ravel())[1:] * float(np.prod(spacing))
    if label.ndim == 2:
        return 2.0 * np.sqrt(sizes / np.pi)
    return 2.0 * np.cbrt(3.0 * sizes / (4.0 * np.pi))


def _depth_mm(lungs, spacing):
    return ndimage.distance_transform_edt(lungs, sampling=spacing)


@pytest.mark.parametrize("morphology", ALL)
@pytest.mark.parametrize("dims", [2, 3])
def test_lesions_only_in_eligible_lung_and_vessels_untouched(morphology, dims, chest2d,
                                                              chest3d):
    hu, lungs, airway = chest2d if dims == 2 else chest3d
    spacing = SPACING_2D if dims == 2 else SPACING_3D
    out, label = synthesize_lesions(hu, lungs, spacing, np.random.default_rng(1), morphology,
                                    0.1)
    assert out.dtype == np.float32 and label.dtype == np.uint8 and out.shape == hu.shape
    assert label.any()
    assert set(np.unique(label)) <= {0, 1}
    lesion = label > 0
    assert not (lesion & ((lungs == 0) | (hu >= -600))).any()
    outside = (lungs == 0) | (hu >= -600)
    np.testing.assert_array_equal(out[outside], hu[outside])  # vessels, walls, body
    assert not (lesion & airway).any()  # native air is never labelled
    np.testing.assert_array_equal(out[airway], hu[airway])
    assert (out - hu)[lungs > 0].sum() < 0  # lesions lower the density


@pytest.mark.parametrize("morphology", CLINICAL + ("mixed",))
def test_lesions_are_tissue_loss_with_texture_and_soft_edges(morphology, chest2d):
    hu, lungs, _ = chest2d
    out, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(2),
                                    morphology, 0.08)
    lesion = label > 0
    values = out[lesion]
    assert values.min() >= -1024.0
    assert values.std() > 3.0  # not one constant value
    # the share of the local tissue left, as the morphology's law draws it (noise aside)
    tissue = tissue_density(hu, SPACING_2D)[lesion]
    remaining = np.median((values + 1000.0) / (tissue + 1000.0))
    low, high = (0.0, 0.7) if morphology == "mixed" else REMAINING[morphology]
    assert low - 0.1 <= remaining <= high + 0.1
    assert np.median((out - hu)[lesion]) < -40.0  # a visible loss, not a faint shade
    # soft edges: voxels just outside the label are changed too: pulled part of the way
    # (partial volume) or raised (a thin wall)
    ring = ndimage.binary_dilation(label > 0) & (label == 0) & (hu < -600) & (lungs > 0)
    shift = (out - hu)[ring]
    assert (np.abs(shift) > 10.0).mean() > 0.3
    if morphology in ("centrilobular", "panlobular"):
        assert (shift < -10.0).mean() > 0.3


def test_worley_keeps_the_published_density_law(chest2d):
    hu, lungs, _ = chest2d
    out, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(3), "worley",
                                    0.2)
    values = out[label > 0]
    assert values.min() >= -1000.0 and values.max() <= -951.0
    assert abs(values.mean() + 975.0) < 0.5 and abs(values.std() - 5.0) < 0.5


def test_worley_full_fraction_is_the_published_coverage(chest2d):
    hu, lungs, _ = chest2d
    _, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(4), "worley",
                                  1.0)
    _, some = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(4), "worley",
                                 0.1)
    share = label.sum() / ((lungs > 0) & (hu < -600)).sum()
    assert 0.2 < share < 0.95  # every cell part farther than 0.3 from its seed
    assert not (some & ~label).any()  # a smaller fraction takes some of the same cells


@pytest.mark.parametrize("morphology", ALL)
@pytest.mark.parametrize("fraction", [0.03, 0.12])
def test_fraction_is_honoured(morphology, fraction, chest2d):
    hu, lungs, airway = chest2d
    eligible = ((lungs > 0) & (hu < -600) & ~airway).sum()
    _, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(5), morphology,
                                  fraction)
    got = label.sum() / eligible
    assert abs(got - fraction) <= 0.2 * fraction + 0.003, got


def test_fraction_in_3d(chest3d):
    hu, lungs, airway = chest3d
    eligible = ((lungs > 0) & (hu < -600) & ~airway).sum()
    for morphology in ("centrilobular", "panlobular", "bullous"):
        _, label = synthesize_lesions(hu, lungs, SPACING_3D, np.random.default_rng(6),
                                      morphology, 0.1)
        assert abs(label.sum() / eligible - 0.1) <= 0.025, morphology


@pytest.mark.parametrize("morphology, low, high", [
    ("centrilobular", 2.0, 12.0),   # holes 2-10 mm, some merging
    ("paraseptal", 4.0, 22.0),      # cysts 5-20 mm, clipped by the pleura
    ("bullous", 9.0, 60.0),         # bullae 10-60 mm
])
def test_component_sizes(morphology, low, high, chest2d):
    hu, lungs, _ = chest2d
    diameters = []
    for seed in range(3):
        _, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(seed),
                                      morphology, 0.06)
        diameters.extend(_diameters_mm(label, SPACING_2D))
    median = float(np.median(diameters))
    assert low <= median <= high, median
    if morphology == "bullous":
        assert max(diameters) >= 10.0


def test_panlobular_is_diffuse_and_gradual(chest2d):
    hu, lungs, _ = chest2d
    out, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(7),
                                    "panlobular", 0.1)
    assert np.median(_diameters_mm(label, SPACING_2D)) > 10.0  # large regions
    shift = (out - hu)[(lungs > 0) & (hu < -600)]
    partial = ((shift < -10.0) & (shift > -45.0)).sum()
    assert partial > 0.2 * (label > 0).sum()  # a wide, gradual margin


def test_subpleural_morphologies_lie_nearer_the_pleura(chest2d):
    hu, lungs, _ = chest2d
    depth = _depth_mm(lungs > 0, SPACING_2D)
    median_depth = {}
    for morphology in ("centrilobular", "paraseptal", "bullous"):
        depths = []
        for seed in range(3):
            _, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(seed),
                                          morphology, 0.05)
            depths.append(depth[label > 0])
        median_depth[morphology] = float(np.median(np.concatenate(depths)))
    assert median_depth["paraseptal"] < 0.5 * median_depth["centrilobular"]
    assert median_depth["bullous"] < median_depth["centrilobular"]
    assert median_depth["paraseptal"] < 10.0


def test_centrilobular_upper_and_panlobular_lower_zones_in_3d(chest3d):
    hu, lungs, _ = chest3d
    z_lung = np.nonzero(lungs)[0].mean()
    height = lungs.shape[0]

    def mean_z(morphology, superior):
        zs = [np.nonzero(synthesize_lesions(hu, lungs, SPACING_3D, np.random.default_rng(s),
                                            morphology, 0.05, superior=superior)[1])[0]
              for s in range(3)]
        return np.concatenate(zs).mean()

    assert mean_z("centrilobular", 1) > z_lung + 0.05 * height
    assert mean_z("centrilobular", -1) < z_lung - 0.05 * height
    assert mean_z("panlobular", 1) < z_lung - 0.03 * height


@pytest.mark.parametrize("morphology", ALL)
def test_deterministic_from_the_rng(morphology, chest2d):
    hu, lungs, _ = chest2d
    a = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(11), morphology)
    b = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(11), morphology)
    c = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(12), morphology)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_nothing_synthesised_gives_an_empty_label(chest2d):
    hu, lungs, _ = chest2d
    out, label = synthesize_lesions(hu, lungs, SPACING_2D, np.random.default_rng(0),
                                    "centrilobular", 0.0)
    assert not label.any() and np.array_equal(out, hu)
    out, label = synthesize_lesions(hu, np.zeros_like(lungs), SPACING_2D,
                                    np.random.default_rng(0), "bullous")
    assert not label.any() and np.array_equal(out, hu)


def test_keep_noise_keeps_the_native_noise_inside_lesions(chest2d):
    hu, lungs, _ = chest2d
    noisy = hu + np.random.default_rng(13).normal(0.0, 30.0, hu.shape).astype(np.float32)
    sd = {}
    for keep in (True, False):
        out, label = synthesize_lesions(noisy, lungs, SPACING_2D, np.random.default_rng(14),
                                        "bullous", 0.1, keep_noise=keep)
        core = ndimage.binary_erosion(label > 0, iterations=2)
        sd[keep] = float(out[core].std())
    assert sd[True] > 15.0 and sd[False] < 8.0


def test_random_training_lesions(chest2d):
    hu, lungs, _ = chest2d
    out, label = random_training_lesions(hu, lungs, SPACING_2D, np.random.default_rng(0),
                                         p_lesion=0.0)
    assert not label.any() and np.array_equal(out, hu)
    with_lesion = [random_training_lesions(hu, lungs, SPACING_2D, np.random.default_rng(s))[1]
                   .any() for s in range(20)]
    assert 12 <= sum(with_lesion) <= 20
    a = random_training_lesions(hu, lungs, SPACING_2D, np.random.default_rng(3), p_lesion=1.0)
    b = random_training_lesions(hu, lungs, SPACING_2D, np.random.default_rng(3), p_lesion=1.0)
    assert a[1].any() and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("args", [
    dict(morphology="interstitial"),
    dict(fraction=1.5),
    dict(spacing=(0.8,)),
    dict(lungs=np.ones((10, 10), dtype=np.uint8)),
])
def test_bad_input_is_refused(args, chest2d):
    hu, lungs, _ = chest2d
    call = dict(hu=hu, lungs=lungs, spacing=SPACING_2D, rng=np.random.default_rng(0),
                morphology="bullous", fraction=0.1) | args
    with pytest.raises(InputError):
        synthesize_lesions(**call)
