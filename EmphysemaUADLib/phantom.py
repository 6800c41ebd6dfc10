"""Synthetic chest CT with known truth: anatomy, optional emphysema, then acquisition.

Everything is deterministic from the seed, which also varies the patient's size and shape.
The anatomy is built in millimetres (patient frame, LPS: +x left, +y posterior, +z superior,
centred on the scan) on the clean "true" image; emphysema is synthesised into it
(lesions.py) and only then does the scanner add its kernel and noise (acquisition.py), so
lesions carry the same noise as everything else. When the field of view is smaller than an
adult chest the whole patient is scaled down so that tests with small arrays still see a
complete thorax in-plane; along z the scan is centred on the lungs and may cut them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import acquisition
from .atomic import write_text_atomic
from .errors import InputError
from .lesions import eligible_voxels, synthesize_lesions
from .measurements import region_masks
from .regions import LEFT, RIGHT, ZONES, lung_zones
from .staging import stage_of
from .volume_io import Geometry, Volume, case_name, write_volume

KERNELS = acquisition.KERNELS
# the phantom's emphysema choices ("mixed": a blend); lesions.MORPHOLOGIES are the lesion
# shapes synthesis draws from (the published Worley cells among them)
PHANTOM_MORPHOLOGIES = ("centrilobular", "paraseptal", "panlobular", "bullous", "mixed")
SEVERITIES = ("none", "mild", "moderate", "severe")
# target share of lung voxels that become lesion (seed-jittered by +-20 %)
LESION_FRACTION = {"none": 0.0, "mild": 0.025, "moderate": 0.12, "severe": 0.35}
DEFAULT_SHAPE = (112, 224, 224)  # z, y, x
DEFAULT_SPACING = (2.5, 1.6, 1.6)  # mm, z, y, x
DEFAULT_NOISE = 20.0  # HU
MAX_VOXELS = 512 * 512 * 600

# Tissue classes of Phantom.tissues, and the true (noise-free) HU of each.
TISSUES = {0: "air", 1: "fat", 2: "muscle", 3: "bone", 4: "lung", 5: "heart and vessels",
           6: "abdomen", 7: "table", 8: "airway", 9: "cartilage and soft tissue"}
AIR, FAT, MUSCLE, BLOOD, LIVER, SPLEEN = -1000.0, -95.0, 45.0, 40.0, 58.0, 45.0
SKIN, CSF, DISC, CARTILAGE = 30.0, 15.0, 85.0, 110.0
CORTEX, MARROW = 850.0, 220.0
LUNG_ANTERIOR, LUNG_POSTERIOR = -895.0, -850.0  # supine: dependent lung is denser
LUNG_TEXTURE_HU = (13.0, 8.0)  # SD of the fine (~1 mm) and lobular (~4 mm) fluctuation


@dataclass
class Phantom:
    ct: Volume  # float32 HU after acquisition
    lungs: np.ndarray  # uint8: 1 right lung, 2 left lung
    lesions: np.ndarray  # uint8: 1 synthesised emphysema
    zones: np.ndarray  # uint8: regions.lung_zones
    truth: dict
    tissues: np.ndarray  # uint8: keys of TISSUES (before lesions and acquisition)


# --- inputs ------------------------------------------------------------------------------
def _check_inputs(seed, shape, spacing, noise, kernel, emphysema, morphology):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"the phantom seed must be a whole number >= 0, not {seed!r}.")
    shape = DEFAULT_SHAPE if shape is None else tuple(shape)
    if len(shape) != 3 or any(not float(n).is_integer() or n < 1 for n in shape) \
            or min(shape[1:]) < 16:
        raise InputError(f"the phantom shape must be three whole numbers (z, y, x) with at "
                         f"least 16 voxels in y and x, not {shape}.")
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) > MAX_VOXELS:
        raise InputError(f"the phantom shape {shape} is too large (at most {MAX_VOXELS} "
                         "voxels).")
    spacing = DEFAULT_SPACING if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and 0.1 <= s <= 20 for s in spacing):
        raise InputError(f"the phantom spacing must be three voxel sizes (z, y, x) between "
                         f"0.1 and 20 mm, not {spacing}.")
    noise = DEFAULT_NOISE if noise is None else float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise InputError(f"the phantom noise must be a standard deviation >= 0 HU, not {noise}.")
    for value, allowed, what in ((kernel, KERNELS, "kernel"), (emphysema, SEVERITIES,
                                                                "emphysema severity"),
                                 (morphology, PHANTOM_MORPHOLOGIES, "emphysema morphology")):
        if value not in allowed:
            raise InputError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}.")
    return int(seed), shape, spacing, noise


# --- geometry helpers ----------------------------------------------------------------------
def _superellipse(x, y, cy, a, b_front, b_back, p_front=2.0, p_back=2.0):
    """Normalised radius (1 on the outline) of a superellipse centred at (0, cy) with
    different half-depths and exponents in front (y < cy) and behind."""
    dy = y - cy
    front = dy < 0
    b = np.where(front, b_front, b_back)
    p = np.where(front, p_front, p_back)
    return (np.abs(x / a) ** p + np.abs(dy / b) ** p) ** (1.0 / p)


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


class _Tubes:
    """Partial-volume fractions of tubes (segments with linearly tapering radii) on the grid,
    each drawn in its own bounding box; overlapping tubes merge (maximum)."""

    def __init__(self, axes_mm, spacing):
        self.axes = axes_mm  # (z, y, x) coordinates of the voxel centres
        self.spacing = np.asarray(spacing)
        self.width = float(np.mean(spacing[1:]))  # partial-volume ramp ~ one pixel
        self.shape = tuple(len(a) for a in axes_mm)

    def draw(self, segments, out=None, margin=0.0) -> np.ndarray:
        out = np.zeros(self.shape, np.float32) if out is None else out
        for p0, p1, r0, r1 in segments:
            self._segment(np.asarray(p0, float), np.asarray(p1, float), r0 + margin,
                          r1 + margin, out)
        return out

    def _segment(self, p0, p1, r0, r1, out) -> None:
        reach = max(r0, r1) + self.width
        box = []
        for axis, coords in enumerate(self.axes):
            lo, hi = min(p0[axis], p1[axis]) - reach, max(p0[axis], p1[axis]) + reach
            i0, i1 = np.searchsorted(coords, [lo, hi])
            if i1 <= i0:
                return
            box.append(slice(i0, i1))
        z, y, x = np.ix_(*[a[b] for a, b in zip(self.axes, box)])
        d = p1 - p0
        length2 = float(d @ d) or 1e-9
        t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / length2,
                    0.0, 1.0)
        dist = np.sqrt((z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2
                       + (x - p0[2] - t * d[2]) ** 2)
        r = r0 + t * (r1 - r0)
        # a tube thinner than a pixel is a fainter, one-pixel line (partial volume)
        frac = np.clip(0.5 + (r - dist) / self.width, 0.0, 1.0) * np.minimum(
            1.0, 2.0 * r / self.width)
        np.maximum(out[tuple(box)], frac.astype(np.float32), out=out[tuple(box)])


def _polyline(points, radii):
    return [(points[i], points[i + 1], radii[i], radii[i + 1]) for i in range(len(points) - 1)]


def _grow_tree(rng, root, points, radius, min_points):
    """A space-filling branching tree from `root` into the territory `points` (N, 3 mm).

    Each branch heads part-way towards the centroid of its territory, then the territory is
    split in two along its longest extent; the children's radii follow a Murray-type law
    with flow proportional to territory size (r^2.7 ~ n, the exponent measured in pulmonary
    arteries). Returns [(p0, p1, r0, r1, parent)]."""
    segments = []
    stack = [(np.asarray(root, float), np.arange(len(points)), radius, -1)]
    while stack:
        start, idx, r, parent = stack.pop()
        territory = points[idx]
        centre = territory.mean(axis=0)
        terminal = len(idx) <= min_points
        end = centre if terminal else start + rng.uniform(0.45, 0.7) * (centre - start)
        r_end = r * 0.95
        segments.append((start, end, r, r_end, parent))
        if terminal:
            continue
        me = len(segments) - 1
        offsets = territory - centre
        axis = np.linalg.svd(offsets, full_matrices=False)[2][0]
        proj = offsets @ axis
        cut = np.quantile(proj, rng.uniform(0.3, 0.7))
        for half in (proj <= cut, proj > cut):
            if half.any():
                share = half.sum() / len(idx)
                stack.append((end, idx[half], r_end * share ** (1 / 2.7), me))
    return segments


# --- the anatomy ---------------------------------------------------------------------------
class _Thorax:
    """The true (noise-free) HU image, the lung truth and tissue classes of one patient."""

    def __init__(self, shape, spacing, rng):
        self.rng = rng
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        self.axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
        self.z = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.x = self.axes[2][None, None, :]
        self.tubes = _Tubes(self.axes, spacing)
        self._patient()
        self.hu = np.full(shape, AIR, np.float32)
        self.tissues = np.zeros(shape, np.uint8)
        self._table_and_body()
        self._chest_wall()
        self._mediastinum()
        self._lungs()
        self._airways_and_vessels()
        self._spine_and_sternum()

    def paint(self, mask, hu, tissue) -> None:
        mask = np.broadcast_to(mask, self.shape)
        self.hu[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, self.shape)[mask]
        self.tissues[mask] = tissue

    def blend(self, fraction, hu, tissue, within=None) -> None:
        if within is not None:
            fraction = fraction * within
        self.hu += fraction * (hu - self.hu)
        self.tissues[fraction >= 0.5] = tissue

    # --- parameters ------------------------------------------------------------------------
    def _patient(self) -> None:
        u = self.rng.uniform
        fov = np.asarray(self.shape) * np.asarray(self.spacing)
        half_width, front, back = u(150, 172), u(100, 118), u(105, 122)
        table = 36.0
        # adult size, or smaller so that the body and the table fit in-plane
        fit = min(1.0, fov[2] / (2 * half_width * 1.05), fov[1] / ((front + back + table) * 1.04))
        s = self.s = u(0.92, 1.05) * fit if fit == 1.0 else fit * u(0.95, 1.0)
        self.body = dict(a=half_width * s, front=front * s, back=back * s,
                         cy=(front - back - table) / 2 * s)
        self.table_y = self.body["cy"] + self.body["back"]
        fat = u(6, 24) * s
        self.fat = dict(lateral=fat * u(0.9, 1.3), front=fat, back=fat * u(0.4, 0.7))
        cy, a = self.body["cy"], self.body["a"]
        muscle_lateral, muscle_front, muscle_back = u(18, 26) * s, u(14, 22) * s, u(34, 44) * s
        self.cavity = dict(a=a - self.fat["lateral"] - muscle_lateral,
                           y_front=cy - self.body["front"] + self.fat["front"] + muscle_front,
                           y_back=cy + self.body["back"] - self.fat["back"] - muscle_back)
        c = self.cavity
        c["cy"] = (c["y_front"] + c["y_back"]) / 2
        c["b"] = (c["y_back"] - c["y_front"]) / 2
        self.height = u(225, 255) * s  # apex to the deepest costophrenic recess
        self.z_apex = self.height / 2 + u(-8, 8) * s
        self.z_base = self.z_apex - self.height
        self.z_dome_right = self.z_apex - self.height * u(0.58, 0.64)
        self.z_dome_left = self.z_dome_right - u(12, 24) * s
        self.z_carina = self.z_apex - u(85, 100) * s
        self.x_mid = u(1, 5) * s  # the mediastinum sits a little to the left
        # spine: vertebral body bulging into the back of the cavity
        self.vb = dict(y=c["y_back"] - 12 * s, rx=u(18, 22) * s, ry=u(14, 17) * s)
        self.y_trachea = self.vb["y"] - self.vb["ry"] - u(20, 26) * s

    def cavity_half_width(self):
        """The chest cavity narrows towards the thoracic inlet."""
        top = np.clip((self.z - (self.z_apex - 110 * self.s)) / (110 * self.s), 0.0, 1.3)
        return self.cavity["a"] * (1.0 - 0.3 * top ** 2)

    def diaphragm(self, x, y):
        """Height of the diaphragm surface (two domes, the right higher) at (x, y)."""
        s, c = self.s, self.cavity
        yd = c["cy"] - 0.15 * c["b"]
        domes = []
        for sign, top in ((-1, self.z_dome_right), (1, self.z_dome_left)):
            xd = sign * 0.42 * c["a"]
            domes.append(top - (x - xd) ** 2 / (2 * 40 * s) - np.maximum(y - yd, 0) ** 2
                         / (2 * 58 * s) - np.minimum(y - yd, 0) ** 2 / (2 * 45 * s))
        z = np.maximum(*domes)
        k = 8 * s  # rounded costophrenic recesses, never below the lung base
        return self.z_base + k * np.logaddexp(0.0, (z - self.z_base) / k)

    # --- outside the chest cavity ----------------------------------------------------------
    def _table_and_body(self) -> None:
        y, x, s = self.y, self.x, self.s
        t = self.table_y
        plates = ((y >= t + 1.0) & (y < t + 3.5)) | ((y >= t + 30 * s) & (y < t + 33 * s))
        core = (y >= t + 3.5) & (y < t + 30 * s)
        wide = np.abs(x) < 230 * s
        self.paint(np.broadcast_to(plates & wide, self.shape), 180.0, 7)
        self.paint(np.broadcast_to(core & wide, self.shape), -920.0, 7)
        b, f = self.body, self.fat
        rho = _superellipse(x, y, b["cy"], b["a"], b["front"], b["back"], 2.2, 3.2)
        self.paint(np.broadcast_to(rho <= 1.0, self.shape), SKIN, 9)
        skin = 2.0 / b["a"]
        self.paint(np.broadcast_to(rho <= 1.0 - skin, self.shape), FAT, 1)
        rho_m = _superellipse(x, y, b["cy"], b["a"] - f["lateral"], b["front"] - f["front"],
                              b["back"] - f["back"], 2.2, 3.2)
        self.paint(np.broadcast_to(rho_m <= 1.0, self.shape), MUSCLE, 2)
        self.muscle_rho = rho_m

    def cavity_rho(self):
        c = self.cavity
        return _superellipse(self.x, self.y, c["cy"], self.cavity_half_width(), c["b"], c["b"],
                             2.4, 2.8)

    def _chest_wall(self) -> None:
        """Ribs (cortex and marrow, cartilage towards the sternum) and the scapulae."""
        u, s, c = self.rng.uniform, self.s, self.cavity
        rho = self.cavity_rho()
        self.cavity_mask = rho <= 1.0
        radius = np.sqrt(self.x ** 2 + (self.y - c["cy"]) ** 2)
        outside = (rho - 1.0) * radius / np.maximum(rho, 1e-6)  # mm beyond the pleura
        phi = np.arctan2(np.abs(self.x), self.y - c["cy"])  # 0 posterior, pi anterior
        pitch, descent = u(22, 26) * s, u(70, 90) * s
        first = self.z_apex + u(10, 20) * s
        # posterior end height of rib k is first - k * pitch; ribs descend anteriorly
        along = first - descent * phi / math.pi
        k = np.clip(np.rint((along - self.z) / pitch), 0, 11)
        dz = self.z - (along - k * pitch)
        half_h, half_t, depth = 5.0 * s, 3.8 * s, 6.0 * s
        e = np.sqrt((dz / half_h) ** 2 + ((outside - depth) / half_t) ** 2)
        reach = np.where(k < 7, 2.95, np.where(k < 10, 2.5, 1.7))  # floating ribs end early
        rib = (e <= 1.0) & (phi > 0.32) & (phi < reach) & (outside > 0) & (self.muscle_rho < 1)
        bony = phi < reach - 0.45
        cortex = 1.0 - 1.3 / half_t
        self.paint(rib & ~bony, CARTILAGE, 9)
        self.paint(rib & bony & (e > cortex), CORTEX, 3)
        self.paint(rib & bony & (e <= cortex), MARROW, 3)
        scapula = ((outside > 17 * s) & (outside < 20 * s) & (phi > 0.55) & (phi < 1.25)
                   & (self.z < self.z_apex + 5 * s) & (self.z > self.z_apex - 150 * s)
                   & (self.muscle_rho < 1))
        self.paint(scapula, 600.0, 3)

    # --- mediastinum and abdomen --------------------------------------------------------------
    def _mediastinum(self) -> None:
        u, s, c = self.rng.uniform, self.s, self.cavity
        x, y, z = self.x, self.y, self.z
        cavity = self.cavity_mask
        z_d = self.diaphragm(x, y)
        self.below = cavity & (z < z_d)
        # cavity: fat, turning into soft tissue towards the thoracic inlet
        inlet = np.clip((z - (self.z_apex - 25 * s)) / (30 * s), 0.0, 1.0)
        self.paint(cavity & ~self.below, FAT + (MUSCLE - 20 - FAT) * inlet, 1)
        # abdomen below the diaphragm: liver on the right, spleen / stomach on the left
        self.paint(self.below & (x < self.x_mid + 25 * s), LIVER, 6)
        self.paint(self.below & (x >= self.x_mid + 25 * s), SPLEEN, 6)
        gx, gy = 0.45 * c["a"], c["cy"] - 0.25 * c["b"]
        gz = self.z_dome_left - 25 * s
        stomach = self.below & (_ellipse(x, y, gx, gy, 38 * s, 30 * s) +
                                ((z - gz) / (22 * s)) ** 2 <= 1)
        self.paint(stomach, 12.0, 6)
        self.paint(stomach & (z > gz + u(-5, 8) * s), AIR, 8)  # gas above the fluid level
        # heart: an ellipsoid resting on the diaphragm, long axis to the left and front
        h = dict(ax=u(56, 66) * s, ay=u(44, 52) * s, az=u(44, 54) * s,
                 x=self.x_mid + u(14, 26) * s, y=c["y_front"] + u(52, 62) * s)
        h["z"] = float(self.diaphragm(h["x"], h["y"])) + 0.75 * h["az"]
        angle = math.radians(u(25, 40))
        xr = (x - h["x"]) * math.cos(angle) - (y - h["y"]) * math.sin(angle)
        yr = (x - h["x"]) * math.sin(angle) + (y - h["y"]) * math.cos(angle)
        inside = (xr / h["ax"]) ** 2 + (yr / h["ay"]) ** 2 + ((z - h["z"]) / h["az"]) ** 2
        self.heart = h
        heart = (inside <= 1.0) & ~self.below & cavity
        epicardial = (inside <= (1.0 + u(5, 9) * s / h["ay"]) ** 2) & ~self.below & cavity
        self.paint(heart, BLOOD + 4.0, 5)
        self.envelope = epicardial.copy()
        self._great_vessels(h)

    def _great_vessels(self, h) -> None:
        """Aorta with its arch branches, caval and brachiocephalic veins, pulmonary trunk and
        arteries, pulmonary veins, oesophagus; also the mediastinal envelope they make."""
        u, s, c = self.rng.uniform, self.s, self.cavity
        top = self.axes[0][-1] + 20 * s
        bottom = self.axes[0][0] - 20 * s
        zc, yt, vb = self.z_carina, self.y_trachea, self.vb
        heart_top = h["z"] + 0.55 * h["az"]
        arch_z = zc + u(12, 18) * s
        asc = np.array([heart_top, c["y_front"] + 50 * s, self.x_mid - 10 * s])
        desc = np.array([arch_z, vb["y"] - vb["ry"] + 2 * s, self.x_mid + 22 * s])
        arch = [np.array([arch_z + 20 * s * math.sin(math.pi * t),
                          asc[1] + (desc[1] - asc[1]) * t, asc[2] + (desc[2] - asc[2]) * t])
                for t in np.linspace(0, 1, 7)]
        r_aorta = u(13, 16) * s
        aorta = _polyline([asc, np.array([arch_z, asc[1], asc[2]])] + arch[1:] +
                          [np.array([bottom, desc[1] + 4 * s, desc[2] - 4 * s])],
                          [r_aorta] * 2 + list(np.linspace(r_aorta, 0.8 * r_aorta, 6)) +
                          [0.75 * r_aorta])
        apex_arch = arch[3]
        branches = []
        for dx, r, spread in ((-8, 6.5, -16), (2, 4.5, 6), (10, 5.0, 26)):
            p0 = apex_arch + np.array([0, 0, dx * s])
            branches.append((p0, np.array([top, p0[1] - 4 * s, p0[2] + spread * s]), r * s,
                             r * s))
        svc_top = np.array([top, c["y_front"] + 45 * s, self.x_mid - 32 * s])
        veins = [(np.array([heart_top - 5 * s, c["y_front"] + 48 * s, self.x_mid - 30 * s]),
                  svc_top, 10 * s, 10 * s),
                 (np.array([arch_z + 35 * s, c["y_front"] + 30 * s, self.x_mid + 45 * s]),
                  np.array([arch_z + 40 * s, c["y_front"] + 42 * s, self.x_mid - 30 * s]),
                  6 * s, 8 * s)]
        # pulmonary arteries: trunk from the front of the heart, branches to the hila
        split = np.array([zc - 14 * s, yt + 4 * s, self.x_mid + 8 * s])
        trunk = (np.array([h["z"] + 0.45 * h["az"], c["y_front"] + 38 * s,
                           self.x_mid + 20 * s]), split, 13 * s, 12 * s)
        self.hilum = {
            RIGHT: dict(artery=np.array([zc - 20 * s, yt + 8 * s, self.x_mid - 52 * s]),
                        bronchus=np.array([zc - 34 * s, yt + 16 * s, self.x_mid - 38 * s]),
                        vein=np.array([zc - 55 * s, yt + 24 * s, self.x_mid - 48 * s])),
            LEFT: dict(artery=np.array([zc - 8 * s, yt + 16 * s, self.x_mid + 54 * s]),
                       bronchus=np.array([zc - 46 * s, yt + 20 * s, self.x_mid + 44 * s]),
                       vein=np.array([zc - 60 * s, yt + 28 * s, self.x_mid + 50 * s]))}
        atrium = np.array([h["z"] + 0.3 * h["az"], h["y"] + 0.55 * h["ay"], h["x"] - 10 * s])
        pulmonary = [trunk]
        for side in (RIGHT, LEFT):
            pulmonary.append((split, self.hilum[side]["artery"], 10 * s, 8 * s))
            pulmonary.append((self.hilum[side]["vein"], atrium, 7 * s, 8 * s))
        oesophagus = (np.array([top, vb["y"] - vb["ry"] - 8 * s, self.x_mid + 3 * s]),
                      np.array([bottom, vb["y"] - vb["ry"] - 10 * s, self.x_mid + 12 * s]),
                      7 * s, 7 * s)
        vessels = aorta + branches + veins + pulmonary
        solid = vessels + [oesophagus]
        self.envelope |= self.tubes.draw(solid, margin=4 * s) >= 0.5
        inside = self.cavity_mask & ~self.below
        self.blend(self.tubes.draw(solid), BLOOD, 5, within=inside)
        self._central_airways(top, arch_z)

    def _central_airways(self, top: float, arch_z: float) -> None:
        """Trachea and main bronchi, and the mediastinal envelope between the lungs and
        around the spine (after the great vessels: the random draws keep their order)."""
        u, s = self.rng.uniform, self.s
        zc, yt, vb = self.z_carina, self.y_trachea, self.vb
        # trachea and main bronchi: air inside a wall of soft tissue
        r_tr = u(8, 10) * s
        self.airway_root = {}
        airways = [(np.array([top, yt, self.x_mid - 2 * s]), np.array([zc, yt + 2 * s,
                                                                        self.x_mid - 2 * s]),
                    r_tr, r_tr)]
        carina = airways[0][1]
        for side, r in ((RIGHT, 6.5), (LEFT, 5.8)):
            airways.append((carina, self.hilum[side]["bronchus"], r_tr * 0.8, r * s))
            self.airway_root[side] = (self.hilum[side]["bronchus"], r * s)
        self.envelope |= self.tubes.draw(airways, margin=6 * s) >= 0.5
        self.central_airways = airways
        # the band between the lungs: thin behind the sternum (anterior junction), wider at the
        # thoracic inlet; the lungs nearly touch in front above the heart
        inlet = np.clip((self.z - arch_z - 30 * s) / (30 * s), 0.0, 1.0)
        half = u(0.6, 1.4) * s + 25 * s * inlet + np.where(self.y > yt - 15 * s, 8 * s, 0.0)
        self.envelope |= np.abs(self.x - self.x_mid) < half
        # the spine and the paravertebral tissue
        self.envelope |= (_ellipse(self.x, self.y, 0.0, vb["y"], vb["rx"] + 6 * s,
                                   vb["ry"] + 6 * s) <= 1) | ((np.abs(self.x) < vb["rx"] + 4 * s)
                                                             & (self.y > vb["y"]))

    # --- lungs -------------------------------------------------------------------------------
    def _lungs(self) -> None:
        u, s, c = self.rng.uniform, self.s, self.cavity
        x, y, z = self.x, self.y, self.z
        lung = self.cavity_mask & ~self.below & ~self.envelope
        # apices: each lung narrows to a rounded dome in the thoracic inlet
        z0 = self.z_apex - u(65, 85) * s
        g = np.clip(1.0 - ((z - z0) / (self.z_apex - z0)) ** 2, 0.0, 1.0) ** 0.8
        g = np.where(z <= z0, 1e3, np.maximum(g, 1e-3))
        cap = np.zeros(self.shape, bool)
        for sign in (-1, 1):
            cx = self.x_mid + sign * 0.45 * c["a"]
            cap |= _ellipse(x, y, cx, c["cy"] + 0.12 * c["b"], 0.5 * c["a"] * g,
                            0.8 * c["b"] * g) <= 1
        lung &= cap & (z > self.z_base)
        # the lungs wrap around the hila but not into them (a thin ring of fat)
        right = lung & (x < self.x_mid)
        self.lungs = np.where(lung, np.where(right, RIGHT, LEFT), 0).astype(np.uint8)
        span = max(c["y_back"] - c["y_front"], 1e-6)
        dependent = np.clip((y - c["y_front"]) / span, 0.0, 1.0)
        base = LUNG_ANTERIOR + (LUNG_POSTERIOR - LUNG_ANTERIOR) * dependent
        texture = self._texture(lung)
        self.paint(lung, (base + texture).astype(np.float32), 4)

    def _texture(self, mask) -> np.ndarray:
        """Fine and lobular-scale correlated fluctuation of the parenchyma, on the lung box."""
        out = np.zeros(self.shape, np.float32)
        if not mask.any():
            return out
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
        shape = tuple(b.stop - b.start for b in box)
        for scale_mm, sd in zip((1.0, 4.0), LUNG_TEXTURE_HU):
            field = ndimage.gaussian_filter(self.rng.standard_normal(shape, np.float32),
                                            [scale_mm / sp for sp in self.spacing], mode="wrap")
            out[box] += field * (sd / max(float(field.std()), 1e-6))
        return out

    # --- airways and pulmonary vessels inside the lungs ----------------------------------------
    def _territory(self, side, n) -> np.ndarray:
        idx = np.flatnonzero(self.lungs == side)
        if idx.size == 0:
            return np.empty((0, 3))
        pick = idx[self.rng.integers(0, idx.size, n)]
        coords = np.stack(np.unravel_index(pick, self.shape), axis=1)
        jitter = self.rng.uniform(-0.5, 0.5, coords.shape)
        return np.stack([self.axes[a][coords[:, a]] for a in range(3)], axis=1) + jitter * \
            np.asarray(self.spacing)

    def _airways_and_vessels(self) -> None:
        s = self.s
        lungs = self.lungs > 0
        vessels, walls, lumens = [], list(self.central_airways), list(self.central_airways)
        for side in (RIGHT, LEFT):
            hilum = self.hilum[side]
            points = self._territory(side, 2200)
            if len(points) < 8:
                continue
            arteries = _grow_tree(self.rng, hilum["artery"], points, 7.0 * s, 2)
            veins = _grow_tree(self.rng, hilum["vein"], self._territory(side, 2200), 7.0 * s, 2)
            vessels += [seg[:4] for seg in arteries + veins]
            self._bronchi(arteries, side, walls, lumens)
        near_hila = np.zeros(self.shape, bool)
        for side in (RIGHT, LEFT):
            for point in self.hilum[side].values():
                near_hila |= ((self.z - point[0]) ** 2 + (self.y - point[1]) ** 2 +
                              (self.x - point[2]) ** 2) <= (25 * s) ** 2
        where = (lungs | (near_hila & self.cavity_mask & ~self.below)).astype(np.float32)
        self.blend(self.tubes.draw(vessels), BLOOD, 5, within=where)
        wall = self.tubes.draw([(p0, p1, r0 * 1.25 + 0.5, r1 * 1.25 + 0.5)
                                for p0, p1, r0, r1 in walls])
        inside = self.cavity_mask & ~self.below
        self.blend(wall, MUSCLE - 5.0, 9, within=inside)
        self.blend(self.tubes.draw(lumens), AIR, 8, within=inside)

    def _bronchi(self, arteries, side, walls, lumens) -> None:
        """Bronchi run beside their arteries (the broncho-arterial pairs) down to ~2 mm lumen;
        the offset is carried from parent to child so the bronchus stays continuous."""
        root, r_root = self.airway_root[side]
        ends = {}
        for i, (p0, p1, r0, r1, parent) in enumerate(arteries):
            if r1 < 1.1 * self.s:
                continue
            direction = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-6)
            previous = ends.get(parent)
            hint = previous[1] if previous is not None else np.array([0.0, -1.0, 0.0])
            offset = hint - direction * (hint @ direction)
            norm = np.linalg.norm(offset)
            offset = offset / norm if norm > 1e-6 else np.array([1.0, 0.0, 0.0])
            start = previous[0] if previous is not None else root
            end = p1 + offset * (r1 + r1 * 0.9 + 1.0)
            r_start = previous[2] if previous is not None else r_root
            lumens.append((start, end, r_start, r1 * 0.9))
            walls.append(lumens[-1])
            ends[i] = (end, offset, r1 * 0.9)

    # --- spine and sternum --------------------------------------------------------------------
    def _spine_and_sternum(self) -> None:
        u, s, c, vb = self.rng.uniform, self.s, self.cavity, self.vb
        x, y, z = self.x, self.y, self.z
        body = _ellipse(x, y, 0.0, vb["y"], vb["rx"], vb["ry"])
        pitch = u(25, 28) * s
        disc = np.abs(((z - self.z_apex) / pitch) % 1.0 - 0.5) * pitch > pitch / 2 - 3.0 * s
        body3 = np.broadcast_to(body <= 1.0, self.shape)
        self.paint(body3, MARROW, 3)
        self.paint(body3 & np.broadcast_to(body > (1 - 2.2 / vb["rx"]) ** 2, self.shape),
                   CORTEX * 0.8, 3)
        self.paint(body3 & disc, DISC, 9)
        canal_y = vb["y"] + vb["ry"] + 10 * s
        canal = _ellipse(x, y, 0.0, canal_y, 8 * s, 8 * s)
        arch = (canal <= ((8 + 5) / 8) ** 2) & (y > vb["y"] + vb["ry"] - 1)
        processes = ((_ellipse(x, y, 0.0, canal_y + 16 * s, 4 * s, 10 * s) <= 1)
                     | (_ellipse(np.abs(x), y, 25 * s, canal_y, 14 * s, 5 * s) <= 1))
        bone = np.broadcast_to((arch | processes) & (canal > 1), self.shape)
        self.paint(bone, 500.0, 3)
        self.paint(np.broadcast_to(canal <= 1, self.shape), CSF, 9)
        # sternum: manubrium at the top, body down to the xiphoid at the heart's base
        top, low = self.z_apex - 25 * s, self.heart["z"] - 0.5 * self.heart["az"]
        wide = 1.0 + 0.8 * np.clip((z - (top - 40 * s)) / (40 * s), 0.0, 1.0)
        st = _ellipse(x, y, 0.0, c["y_front"] - 7 * s, 13 * s * wide, 6 * s)
        level = (z < top) & (z > low)
        self.paint((st <= 1) & level, CORTEX * 0.7, 3)
        self.paint((st <= (1 - 1.5 / (6 * s)) ** 2) & level, MARROW - 60.0, 3)


# --- public API ----------------------------------------------------------------------------
def _scanner_geometry(shape, spacing, rng) -> Geometry:
    """Isocentre at x = y = 0 (the reconstruction centre), table position along z."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z0 = -round(float(rng.uniform(100.0, 400.0)), 1)
    return Geometry((sx, sy, sz), (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, z0),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _truth(seed, params, lungs, lesions, zones, voxel_ml) -> dict:
    regions = {}
    for name, mask in region_masks(lungs, zones, ZONES):
        n = int(np.count_nonzero(mask))
        index = 100.0 * np.count_nonzero(lesions[mask]) / n if n else None
        regions[name] = {"volume_ml": round(n * voxel_ml, 2),
                         "emphysema_index_percent": None if index is None else round(float(index), 4),
                         "stage": None if index is None else stage_of(index)}
    return {"seed": seed, "parameters": params, "regions": regions,
            "stage": regions["whole lung"]["stage"]}


def make_phantom(seed=0, shape=None, spacing=None, noise=None, kernel="smooth",
                 emphysema="none", morphology="mixed") -> Phantom:
    """A synthetic chest CT (see the module notes); shape (z, y, x), spacing mm (z, y, x),
    noise SD in HU. The anatomy depends on the seed only, not on the emphysema settings."""
    seed, shape, spacing, noise = _check_inputs(seed, shape, spacing, noise, kernel, emphysema,
                                                morphology)
    anatomy_rng, lesion_rng, scanner_rng = (np.random.default_rng(s) for s in
                                            np.random.SeedSequence(seed).spawn(3))
    geometry = _scanner_geometry(shape, spacing, scanner_rng)
    thorax = _Thorax(shape, spacing, anatomy_rng)
    hu, lungs = thorax.hu, thorax.lungs
    target = LESION_FRACTION[emphysema] * lesion_rng.uniform(0.8, 1.2)
    lesions = np.zeros(shape, np.uint8)
    if target > 0 and lungs.any():
        eligible = np.count_nonzero(eligible_voxels(hu, lungs > 0))
        share = min(1.0, target * np.count_nonzero(lungs) / max(eligible, 1))
        hu, lesions = synthesize_lesions(hu, lungs > 0, spacing, lesion_rng, morphology, share)
    ct = acquisition.simulate_acquisition(hu, spacing, noise, kernel, scanner_rng)
    ct = np.maximum(ct, -1024.0).astype(np.float32)  # stored CT values start at -1024
    zones = lung_zones(lungs, geometry)
    params = {"shape": list(shape), "spacing_mm": list(spacing), "noise_hu": noise,
              "kernel": kernel, "emphysema": emphysema, "morphology": morphology,
              "target_lesion_percent": round(100 * target, 3),
              "patient_scale": round(thorax.s, 4)}
    truth = _truth(seed, params, lungs, lesions, zones, geometry.voxel_ml)
    return Phantom(Volume(ct, geometry, f"phantom seed {seed}"), lungs, lesions, zones, truth,
                   thorax.tissues)


def write_phantom(phantom: Phantom, output, truth_dir=None, png=None) -> list[Path]:
    """Write the CT (int16 HU, like a scanner), its preview PNG (beside the CT as
    <name>.png unless `png` is given) and, with truth_dir, lungs, lesions, zones and
    truth.json. Returns the files written."""
    output = Path(output)
    g = phantom.ct.geometry
    ct = np.clip(np.rint(phantom.ct.array), -1024, 3071).astype(np.int16)
    written = [write_volume(ct, g, output)]
    if truth_dir is not None:
        folder = Path(truth_dir)
        for name, array in (("lungs", phantom.lungs), ("lesions", phantom.lesions),
                            ("zones", phantom.zones)):
            written.append(write_volume(array.astype(np.uint8), g, folder / f"{name}.nii.gz"))
        written.append(_write_json(phantom.truth, folder / "truth.json"))
    from .render import render_preview

    preview = Path(png) if png is not None else output.with_name(case_name(output) + ".png")
    written.append(render_preview(phantom.ct, preview, labels=phantom.lesions,
                                  outline=phantom.lungs))
    return written


def _write_json(data: dict, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2))
