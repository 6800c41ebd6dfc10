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

Diffuse loss. Panlobular emphysema destroys whole lobules evenly: a uniform darkening without
edges, which the network reads as a healthy lung at another inspiration level (it is taught
that level's range) and barely flags. A lobule's worth of parenchyma that is itself at
emphysema density is lost tissue whatever the network says, so detection counts the lung
whose parenchyma, averaged over about a secondary lobule (a Gaussian of LOBULE_MM; lobules
are 10-25 mm across), lies below -950 HU on the scan's own scale. The average is taken in
3-D, as a lobule is, where noise is not: a healthy phantom with 50 HU of smooth-kernel
(correlated) noise read 0.7 % (Mild) when averaged in-plane only, 0.24 % (None) in 3-D; an
image of one slice is averaged in-plane. Air spaces (the voxels at the air level: airway
lumens, bullae) are left out of that average, so that the lung around an airway, and its
lumen, are not darkened by the lumen; the air-dark voxels of a lobule whose parenchyma is at
emphysema density are counted with it. On the healthy scans of ../shared/data it counts
nothing, nor on them darkened as by a deeper inspiration (tissue fraction x 2/3); the same
scans darkened to half and to 0.35 of their tissue, as diffuse emphysema, read 1.2-1.3 % and
4.5-9.6 % from the network's flags and 3.6-3.7 % and 19-21 % with it, nearer LAA-950 (6-9 %
and 26-43 %). On the 55 labelled slices it changes no stage.

Destroyed tissue. A flag counts only where the lung is itself at that density: emphysema
is lost tissue, and a flag on lung above -950 HU is not a hole. On the healthy scans of
../shared/data the network's flags lie at -945 to -930 HU in the median (smoothed as above),
the sharp kernel's darkened parenchyma and the dark fringes it draws beside vessels; on the
labelled emphysema slices at the air level itself (99 % within 60 HU of it). Where the scan's
air could not be measured (an ROI) its scale is unknown, and no flag is taken away.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .calibration import AIR_HU, HuCheck
from .regions import in_plane_cross, in_plane_sigma, superior_axis
from .volume_io import Volume

BULLA_DIAMETER_MM = 10.0
AIR_MARGIN_HU = 30.0  # above the air level: noise left after smoothing, partial volume
SMOOTH_MM = 1.0
EMPHYSEMA_MARGIN_HU = 50.0  # above the air level: -950 HU where air reads -1000 HU
REACH_MM = 3.0
LOBULE_MM = 4.0  # Gaussian sigma (FWHM 9.4 mm): the smallest secondary lobules
MIN_PARENCHYMA_WEIGHT = 0.1  # share of a lobule's neighbourhood that must be parenchyma
# What lies within WALL_MM around a bulla is mostly lung (its wall, then parenchyma; one at
# the pleura or the mediastinum also touches what lies beyond): 0.62-0.97 around the real
# bullae of the labelled slices. Gas in the stomach that the lung mask took in under a thin
# diaphragm is walled by the abdomen (0.28-0.35 on the phantoms) and is not counted.
WALL_MM = 6.0
MIN_LUNG_WALL_SHARE = 0.5


def air_level(check: HuCheck | None, corrected: bool) -> float | None:
    """The HU of air in the CT as detection sees it: the air measured outside the body (less
    the scale's shift when that was taken off); None where none was measured."""
    if check is None or check.air_hu is None:
        return None
    return check.air_hu - (check.shift_hu if corrected and check.shifted else 0.0)


class LungDensity:
    """The CT around the lungs, smoothed in-plane over SMOOTH_MM (noise, a sharp kernel's
    grain), read against the scan's air level (`air_hu`, measured; None: nominal air, and
    no flag is taken away): computed once for bullae and extents. The box is the lungs' and
    WALL_MM around them, so that what surrounds a bulla is seen (the lungs' end limits its
    depth, a scan's end does not)."""

    def __init__(self, ct: Volume, lungs: np.ndarray, air_hu: float | None = None):
        self.shape = ct.shape
        self.spacing = np.asarray(ct.geometry.spacing_zyx, dtype=float)
        self.axis = superior_axis(ct.geometry)[0]
        self.cross = in_plane_cross(ct.geometry)
        self.measured = air_hu is not None
        self.air_hu = AIR_HU if air_hu is None else air_hu
        self.margin = [int(np.ceil(WALL_MM / s)) + 1 for s in self.spacing]  # voxels
        found = ndi.find_objects((lungs > 0).astype(np.uint8))
        self.box = None
        if found:
            self.box = tuple(slice(max(s.start - m, 0), s.stop + m)
                             for s, m in zip(found[0], self.margin))
            self.inside = lungs[self.box] > 0
            self.smooth = ndi.gaussian_filter(ct.array[self.box].astype(np.float32),
                                              in_plane_sigma(ct.geometry, SMOOTH_MM))

    def _whole(self, part: np.ndarray) -> np.ndarray:
        whole = np.zeros(self.shape, bool)
        whole[self.box] = part
        return whole

    def bullae(self) -> np.ndarray:
        """Bool mask of the lung voxels in bullae (see the module docstring)."""
        if self.box is None:
            return np.zeros(self.shape, bool)
        spaces, _ = ndi.label((self.smooth < self.air_hu + AIR_MARGIN_HU) & self.inside)
        bullae = np.zeros(spaces.shape, bool)
        for label, where in enumerate(ndi.find_objects(spaces), 1):
            # only spaces at least a bulla wide in-plane can hold one; the rest are small
            # airways and noise, and skipping them keeps this fast
            if where is None or any((where[a].stop - where[a].start) * self.spacing[a]
                                    < BULLA_DIAMETER_MM for a in range(3) if a != self.axis):
                continue
            # a margin for the wall: the distance to the nearest voxel that is not this space
            padded = tuple(slice(max(w.start - m, 0), w.stop + m)
                           for w, m in zip(where, self.margin))
            space = spaces[padded] == label
            depth = ndi.distance_transform_edt(space, sampling=self.spacing)
            if not (depth >= BULLA_DIAMETER_MM / 2.0).any():  # a centre a radius deep
                continue
            wall = ndi.distance_transform_edt(~space, sampling=self.spacing) <= WALL_MM
            wall &= ~space
            if self.inside[padded][wall].mean() >= MIN_LUNG_WALL_SHARE:
                bullae[padded] |= space
        return self._whole(bullae)

    def diffuse_loss(self) -> np.ndarray:
        """Bool mask of the lung whose parenchyma, averaged over about a lobule, is at
        emphysema density (see the module docstring)."""
        if self.box is None:
            return np.zeros(self.shape, bool)
        parenchyma = self.inside & (self.smooth >= self.air_hu + AIR_MARGIN_HU)
        sigma = [LOBULE_MM / s for s in self.spacing]  # a lobule is 3-D; noise is not
        weight = ndi.gaussian_filter(parenchyma.astype(np.float32), sigma)
        total = ndi.gaussian_filter(np.where(parenchyma, self.smooth, 0.0), sigma)
        # where a lobule's worth around a voxel is nearly all air (a large airway, a bulla)
        # there is no parenchyma to average: not diffuse loss (bullae are found apart)
        seen = weight > MIN_PARENCHYMA_WEIGHT
        mean = total / np.where(seen, weight, 1.0)
        return self._whole(self.inside & seen & (mean < self.air_hu + EMPHYSEMA_MARGIN_HU))

    def extent(self, flags: np.ndarray) -> np.ndarray:
        """The emphysema label: `flags` (bool, in the lungs) that lie at emphysema density,
        each grown up to REACH_MM in-plane through connected lung at that density (see the
        module docstring)."""
        if self.box is None or not flags.any():
            return flags
        dense = (self.smooth < self.air_hu + EMPHYSEMA_MARGIN_HU) & self.inside
        seeds = flags[self.box] & dense if self.measured else flags[self.box]
        # in-plane steps of one pixel: pixels are square in-plane, or nearly
        steps = min(int(round(REACH_MM / s)) for a, s in enumerate(self.spacing)
                    if a != self.axis)
        return self._whole(ndi.binary_dilation(seeds, self.cross, iterations=max(1, steps),
                                               mask=dense | seeds))
