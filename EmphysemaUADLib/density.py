"""What detection adds to the network's flags by density: bullae, and each lesion's extent.

Bullae. The network does not flag the inside of a large air space. Away from its wall it sees
uniform air, as in the air around the body and the airways, which it learnt as normal: on
a labelled HRCT slice of ../shared/data a bulla 4 cm across read 0 inside, only its rim was
flagged. A bulla is emphysema by definition (an air space more than 1 cm across with a thin
wall, Fleischner glossary), so detection adds the bullae by density: the lung voxels at the
scan's own air level (smoothed over SMOOTH_MM, within AIR_MARGIN_HU of the air measured
outside the body, so a shifted HU scale shifts the level with it) in air spaces that hold a
ball BULLA_DIAMETER_MM across and are walled mostly by lung. Airways in the lung mask are
narrower: the trachea and main bronchi are left out of it (lungs.py). On the healthy scans
of ../shared/data no voxel is found (kernel L: 0.01 % of the lung); on the 55 labelled
slices, three of severity 2-3 hold some.

Extent. The network flags a lesion's darkest core more than its whole: on the labelled
slices its index stayed below LAA-950 on emphysema and under-staged it. Each flag is
extended up to REACH_MM into connected lung at emphysema density: below -950 HU on the
scan's own scale (air + 50 HU), smoothed over SMOOTH_MM. A flag is needed to start from, so
the scattered dark voxels of a noisy or deeply inspired healthy lung, which a -950 HU
threshold counts, stay out. The reach is set by healthy lungs, not by the labels: the thorax
CT of ../shared/data darkened as by a deep inspiration (Perc15 -918 HU) reads a whole-lung
index of 0.21 % from the flags alone, 0.42 % with 3 mm of reach, 0.49 % with 5 mm (the
radius of the largest centrilobular lesions) and 1.2 % without a bound; 3 mm keeps it well
inside None.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .calibration import AIR_HU, HuCheck
from .regions import superior_axis
from .volume_io import Volume

BULLA_DIAMETER_MM = 10.0
AIR_MARGIN_HU = 30.0  # above the air level: noise left after smoothing, partial volume
SMOOTH_MM = 1.0
EMPHYSEMA_MARGIN_HU = 50.0  # above the air level: -950 HU where air reads -1000 HU
REACH_MM = 3.0
# What lies within WALL_MM around a bulla is mostly lung (its wall, then parenchyma; one at
# the pleura or the mediastinum also touches what lies beyond): 0.62-0.97 around the real
# bullae of the labelled slices. Gas in the stomach that the lung mask took in under a thin
# diaphragm is walled by the abdomen (0.28-0.35 on the phantoms) and is not counted.
WALL_MM = 6.0
MIN_LUNG_WALL_SHARE = 0.5


def air_level(check: HuCheck | None, corrected: bool) -> float:
    """The HU of air in the CT as detection sees it: the air measured outside the body (less
    the scale's shift when that was taken off), else nominal air."""
    if check is None or check.air_hu is None:
        return AIR_HU
    return check.air_hu - (check.shift_hu if corrected and check.shifted else 0.0)


def _smoothed(ct: Volume, box) -> np.ndarray:
    """The CT in `box`, smoothed in-plane over SMOOTH_MM (noise, a sharp kernel's grain)."""
    axis = superior_axis(ct.geometry)[0]
    sigma = [0.0 if a == axis else SMOOTH_MM / s for a, s in enumerate(ct.geometry.spacing_zyx)]
    return ndi.gaussian_filter(ct.array[box].astype(np.float32), sigma)


def find_bullae(ct: Volume, lungs: np.ndarray, air_hu: float = AIR_HU) -> np.ndarray:
    """Bool mask of the lung voxels in bullae (see the module docstring)."""
    spacing = np.asarray(ct.geometry.spacing_zyx, dtype=float)
    axis = superior_axis(ct.geometry)[0]
    inside = lungs > 0
    air = np.zeros(ct.shape, bool)
    found = ndi.find_objects(inside.astype(np.uint8))
    if not found:
        return air
    # the lungs' box and one voxel of what surrounds them in-plane, so that the pleura limits
    # a bulla's depth; along the scan axis a scan's end does not (the bulla goes on beyond)
    box = tuple(s if a == axis else slice(max(s.start - 1, 0), s.stop + 1)
                for a, s in enumerate(found[0]))
    spaces, _ = ndi.label((_smoothed(ct, box) < air_hu + AIR_MARGIN_HU) & inside[box])
    margin = [int(np.ceil(WALL_MM / s)) + 1 for s in spacing]
    bullae = np.zeros(spaces.shape, bool)
    for label, where in enumerate(ndi.find_objects(spaces), 1):
        # only spaces at least a bulla wide in-plane can hold one; the rest are small airways
        # and noise, and skipping them keeps this fast
        if where is None or any((where[a].stop - where[a].start) * spacing[a]
                                < BULLA_DIAMETER_MM for a in range(3) if a != axis):
            continue
        # a margin for the wall: the distance to the nearest voxel that is not this space
        padded = tuple(slice(max(w.start - margin[a], 0), w.stop + margin[a])
                       for a, w in enumerate(where))
        space = spaces[padded] == label
        depth = ndi.distance_transform_edt(space, sampling=spacing)
        if not (depth >= BULLA_DIAMETER_MM / 2.0).any():  # a bulla's centre lies a radius deep
            continue
        wall = ndi.distance_transform_edt(~space, sampling=spacing) <= WALL_MM
        wall &= ~space
        if inside[box][padded][wall].mean() >= MIN_LUNG_WALL_SHARE:
            bullae[padded] |= space
    air[box] = bullae
    return air


def lesion_extent(flags: np.ndarray, ct: Volume, lungs: np.ndarray,
                  air_hu: float = AIR_HU) -> np.ndarray:
    """`flags` (bool) grown up to REACH_MM in-plane through connected lung at emphysema
    density (see the module docstring)."""
    found = ndi.find_objects(flags.astype(np.uint8))
    if not found:
        return flags
    spacing = ct.geometry.spacing_zyx
    axis = superior_axis(ct.geometry)[0]
    steps = {a: int(round(REACH_MM / spacing[a])) for a in range(3) if a != axis}
    box = tuple(s if a == axis else slice(max(s.start - steps[a], 0), s.stop + steps[a])
                for a, s in enumerate(found[0]))
    dense = (_smoothed(ct, box) < air_hu + EMPHYSEMA_MARGIN_HU) & (lungs[box] > 0)
    # in-plane steps of one pixel: pixels are square in-plane, or nearly
    step = np.zeros((3, 3, 3), bool)
    step[tuple(slice(None) if a != axis else 1 for a in range(3))] = \
        ndi.generate_binary_structure(2, 1)
    grown = flags.copy()
    grown[box] = ndi.binary_dilation(flags[box], step, iterations=max(1, min(steps.values())),
                                     mask=dense | flags[box])
    return grown
