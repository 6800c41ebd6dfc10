"""Synthetic emphysema lesions for training on healthy lungs.

Works on a 2-D slice (y, x) or a 3-D volume (z, y, x), `spacing` in mm in the same axis order.
Lesions go only inside the lung and where the input is below -600 HU, so vessels, airway walls
and nodules are spared. The label marks the synthesised voxels only (never native low-density
voxels such as airways or noise). Everything random comes from `rng`.

Order of use: synthesise on a clean image (phantom) or a native CT, then simulate acquisition
(acquisition.py) if wanted. With `keep_noise` (default) a lesion interior keeps the image's own
fine texture, i.e. on a native CT its noise, so lesions do not show up as smoother patches.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .acquisition import check_image
from .errors import InputError

MORPHOLOGIES = ("worley", "centrilobular", "paraseptal", "panlobular", "bullous")
CLINICAL = ("centrilobular", "paraseptal", "panlobular", "bullous")
# random_training_lesions: centrilobular is by far the commonest form in smokers. The published
# Worley cells (hard-edged air) are left out: they reward flagging sharp dark patches, which is
# what healthy lung beside vessels can look like on a sharp kernel; without them real slices
# were staged more often and a sharp-kernel healthy scan less (README, "Real emphysema").
# Phantoms and the benchmark still offer them.
TRAINING_WEIGHTS = {"centrilobular": 0.35, "paraseptal": 0.15, "panlobular": 0.15,
                    "bullous": 0.1}
FRACTION_RANGE = (0.005, 0.30)  # drawn log-uniformly when no fraction is given

ELIGIBLE_BELOW_HU = -600.0
NATIVE_AIR_HU = -950.0  # locally (~1 voxel) below this: airway lumen or native emphysema
FULL_EFFECT_BELOW_HU = -650.0  # a 50 HU ramp keeps vessel edges from turning into hard steps
LOWEST_HU = -1024.0  # the floor of stored CT values on most scanners
LOWEST_AIR_HU = -1000.0  # air: no tissue left
TISSUE_SCALE_MM = 2.0  # local parenchymal density: Gaussian sigma over which it is averaged
# Tissue left in a lesion (share of the local density above air), drawn uniformly per lesion:
# small holes keep partial volume and noise, not a constant -975 HU; panlobular emphysema is a
# diffuse, partial loss. (The real HRCT slices whose holes read -880..-990 HU, which suggested
# this, turned out to read air at -920 HU: their scale is shifted by +77 HU, calibration.py.)
REMAINING = {"centrilobular": (0.0, 0.55), "paraseptal": (0.0, 0.35), "bullous": (0.0, 0.1),
             "panlobular": (0.3, 0.7)}


# --- the image being edited ---------------------------------------------------------------
class _Scene:
    """A lung-box crop of the image with what every morphology needs, computed once."""

    def __init__(self, hu, lungs, spacing, rng, keep_noise, superior, slice_shape):
        self.hu = hu
        self.slice_shape = slice_shape  # in-plane size of the whole image, not of the crop
        self.lungs = lungs
        self.spacing = spacing
        self.rng = rng
        self.shape = hu.shape
        self.out = hu.copy()
        self.label = np.zeros(hu.shape, dtype=bool)
        self.eligible = eligible_voxels(hu, lungs)
        ramp = (ELIGIBLE_BELOW_HU - hu) / (ELIGIBLE_BELOW_HU - FULL_EFFECT_BELOW_HU)
        self.weight = np.clip(ramp, 0.0, 1.0).astype(np.float32) * self.eligible
        self.edge = float(np.mean(spacing[-2:]))  # soft-edge width: about one in-plane voxel
        self.texture = _fine_texture(hu) if keep_noise else np.float32(0.0)
        self.tissue = tissue_density(hu, spacing)
        self.height = _relative_height(lungs, superior) if hu.ndim == 3 else None
        self._depth = None

    @property
    def free(self) -> np.ndarray:
        return self.eligible & ~self.label

    @property
    def depth(self) -> np.ndarray:
        """Distance (mm) to the lung surface, for subpleural placement."""
        if self._depth is None:
            self._depth = ndimage.distance_transform_edt(self.lungs, sampling=self.spacing)
        return self._depth

    def blend(self, membership, target, spared=None) -> None:
        """Pull the image towards `target` by `membership` (0..1), sparing non-eligible voxels;
        label the free voxels pulled at least half-way, less `spared` (0..1: tissue such as
        walls and dots drawn inside the lesion, which is not low-density lesion)."""
        w = membership * self.weight
        self.out += w * (target - self.out)
        self.label |= (w >= 0.5) & self.free
        if spared is not None:
            self.label &= spared < 0.25

    def thinned(self, remaining) -> np.ndarray:
        """HU after keeping only `remaining` (0..1, scalar or map) of the local tissue:
        emphysema destroys alveolar walls, so a lesion is less tissue than its surroundings,
        not a fixed air value (a hole in dense lung stays denser than one in a hyperinflated
        lung, and partial volume is kept)."""
        return LOWEST_AIR_HU + remaining * (self.tissue - LOWEST_AIR_HU)

    def coordinates(self, flat_index) -> np.ndarray:
        return np.stack(np.unravel_index(flat_index, self.shape), axis=-1)


def _in_plane(ndim, sigma):
    return [0.0] * (ndim - 2) + [sigma, sigma]


def eligible_voxels(hu, lungs) -> np.ndarray:
    """Where lesions may go: lung below -600 HU (no vessels, walls, nodules), except native air
    (airway lumen, existing low-density areas): it is not synthesised and must stay unlabelled."""
    eligible = lungs & (hu < ELIGIBLE_BELOW_HU)
    core = (ndimage.gaussian_filter(hu, _in_plane(hu.ndim, 1.0)) < NATIVE_AIR_HU) & lungs
    if core.any():
        # and the rim of such a region, whose smoothed value the wall raises
        in_plane = ndimage.generate_binary_structure(2, 1).reshape((1,) * (hu.ndim - 2) + (3, 3))
        eligible &= ~(ndimage.binary_dilation(core, in_plane, iterations=2) & (hu < -900.0))
    return eligible


def _fine_texture(hu) -> np.ndarray:
    """High-pass of the lung-range image (noise, fine texture), clipped at 3 robust SDs so that
    vessel fragments do not carry over into a lesion."""
    lung_range = np.clip(hu, LOWEST_HU, ELIGIBLE_BELOW_HU)
    # 1.5 voxels: keeps most of the noise grain of any kernel
    texture = lung_range - ndimage.gaussian_filter(lung_range, _in_plane(hu.ndim, 1.5))
    sample = texture[hu < ELIGIBLE_BELOW_HU][::97]  # a subsample is plenty for a robust SD
    if sample.size == 0:
        return np.zeros_like(texture)
    limit = 3.0 * 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    return np.clip(texture, -limit, limit)


def tissue_density(hu, spacing) -> np.ndarray:
    """Local parenchymal density (HU): the image with vessels clipped to -600 HU, averaged
    over about 2 mm in-plane, so that a lesion's density follows the lung around it."""
    lung_range = np.clip(hu, LOWEST_AIR_HU, ELIGIBLE_BELOW_HU)
    sigma = [0.0] * (hu.ndim - 2) + [TISSUE_SCALE_MM / s for s in spacing[-2:]]
    return ndimage.gaussian_filter(lung_range, sigma)


def _relative_height(lungs, superior: int) -> np.ndarray:
    """Per slice: 0 at the lung base, 1 at the apex, shaped (z, 1, 1)."""
    z = np.flatnonzero(lungs.any(axis=(1, 2)))
    t = (np.arange(lungs.shape[0]) - z[0]) / max(z[-1] - z[0], 1)
    t = np.clip(t if superior > 0 else 1.0 - t, 0.0, 1.0)
    return t.astype(np.float32)[:, None, None]


def _smooth_field(shape, spacing, scale_mm, rng) -> np.ndarray:
    """Gaussian random field of unit SD with features of about `scale_mm`, made on a coarse
    grid and interpolated linearly, one axis at a time (a full-resolution blur of that width
    is slow in 3-D)."""
    step = np.maximum(scale_mm / 4.0, spacing)
    coarse = tuple(int(math.ceil(n * s / c)) + 2 for n, s, c in zip(shape, spacing, step))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 2.0,
                                    mode="wrap")
    for axis, (n, s, c) in enumerate(zip(shape, spacing, step)):
        position = np.arange(n) * s / c
        low = position.astype(int)
        w = (position - low).astype(np.float32).reshape([-1] + [1] * (len(shape) - axis - 1))
        field = np.take(field, low, axis) * (1 - w) + np.take(field, low + 1, axis) * w
    return (field - field.mean()) / max(float(field.std()), 1e-6)


# --- holes: centrilobular, paraseptal, bullous --------------------------------------------
class _Holes:
    """Round, slightly elliptical air spaces added one by one until `target` voxels are
    covered; overlapping holes merge. Soft edges over about one voxel. `irregular` makes the
    margins lumpy (a smooth random field of ~3 mm features moves the edge by up to ~1/3 of
    the radius), as for the ill-defined holes of centrilobular emphysema."""

    def __init__(self, scene: _Scene, target: int, irregular: bool = False):
        self.scene = scene
        self.target = target
        self.lumps = (_smooth_field(scene.shape, scene.spacing, 3.0, scene.rng) if irregular
                      else None)
        self.reach = np.full(scene.shape, -1e3, dtype=np.float32)  # mm inside nearest hole edge
        self.remaining = np.zeros(scene.shape, dtype=np.float32)  # tissue kept, 0..1
        self.wall = np.zeros(scene.shape, dtype=np.float32)
        self.dot = np.zeros(scene.shape, dtype=np.float32)
        self.countable = scene.free & (scene.weight >= 0.5)
        self.axes_mm = [np.arange(n, dtype=np.float32) * s for n, s in zip(scene.shape,
                                                                           scene.spacing)]
        self.covered = 0

    @property
    def left(self) -> int:
        return self.target - self.covered

    def fitting(self, radius: float) -> float:
        """`radius` (mm), but no hole much larger than the voxels left to cover."""
        volume = self.left * float(np.prod(self.scene.spacing))
        if len(self.scene.shape) == 3:
            return min(radius, (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0))
        return min(radius, math.sqrt(volume / math.pi))

    def add(self, centre, radius, remaining, stretch, dot=0.0, wall=0.0) -> None:
        s = self.scene
        half = [int(math.ceil((radius * 1.5 + 2 * s.edge) / sp)) for sp in s.spacing]
        box = tuple(slice(max(c - h, 0), min(c + h + 1, n))
                    for c, h, n in zip(centre, half, s.shape))
        offsets = np.ix_(*[(ax[b] - c * sp) * k for ax, b, c, sp, k in
                           zip(self.axes_mm, box, centre, s.spacing, stretch)])
        distance = np.sqrt(sum(o * o for o in offsets))
        inside = radius - distance
        if self.lumps is not None:
            inside += 0.3 * radius * self.lumps[box]
        current = self.reach[box]
        self.covered += int(np.count_nonzero((inside > 0) & (current <= 0) & self.countable[box]))
        better = inside > current
        current[better] = inside[better]
        self.remaining[box][better] = remaining
        if wall:
            # a thin wall (~1 voxel) peaking one voxel outside the edge; where it falls inside a
            # neighbouring hole it is the septum between the two
            ring = np.clip(1.0 - np.abs(inside + s.edge) / s.edge, 0.0, None) * wall
            np.maximum(self.wall[box], ring, out=self.wall[box])
        if dot:
            # the centrilobular artery, ~1 mm across, running through the hole: a 1-2 voxel
            # spot in each axial slice (a rod along z in 3-D); fainter on coarse voxels
            across = sum(o * o for o in offsets[-2:])
            spot = np.exp(-across / (2 * 0.45 ** 2)) * (inside > 0) * dot
            np.maximum(self.dot[box], spot, out=self.dot[box])

    def finish(self, wall_hu=None, dot_hu=None) -> None:
        s = self.scene
        membership = np.clip(0.5 + self.reach / s.edge, 0.0, 1.0)
        s.blend(membership, s.thinned(self.remaining) + s.texture,
                np.maximum(self.wall, self.dot))
        for weight, hu in ((self.wall, wall_hu), (self.dot, dot_hu)):
            if hu is not None:
                s.out += weight * s.weight * (hu - s.out)


def _stretch(rng, ndim, spread=0.15) -> np.ndarray:
    return np.exp(rng.normal(0.0, spread, ndim))


def _weighted_picker(scene, mask, weight_of_slice=None):
    """Draws voxel coordinates from `mask`, optionally weighted per slice (3-D zones)."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return None
    if weight_of_slice is None:
        return lambda n: scene.coordinates(flat[scene.rng.integers(0, flat.size, n)])
    z = flat // int(np.prod(scene.shape[1:]))
    cdf = np.cumsum(weight_of_slice[z], dtype=np.float64)
    return lambda n: scene.coordinates(flat[np.minimum(np.searchsorted(
        cdf, scene.rng.random(n) * cdf[-1]), flat.size - 1)])


def _fill(holes: _Holes, propose) -> None:
    """Adds proposed holes until the target is covered or proposals stop helping."""
    idle = 0
    while holes.left > 0 and idle < 20:
        before = holes.covered
        for hole in propose():
            holes.add(**hole)
            if holes.left <= 0:
                break
        idle = idle + 1 if holes.covered == before else 0


def _in_box(points, shape) -> np.ndarray:
    return np.all((points >= 0) & (points < np.asarray(shape)), axis=1)


def _centrilobular(scene: _Scene, target: int) -> None:
    """Clusters of small holes, 2-10 mm across, without a visible wall, often with the
    centrilobular artery as a central dot; upper-zone predominant (Fleischner glossary; Lynch
    et al., Radiology 2015)."""
    rng = scene.rng
    zone = None if scene.height is None else np.exp(3.0 * (scene.height.ravel() - 1.0))
    pick = _weighted_picker(scene, scene.free, zone)
    if pick is None:
        return
    holes = _Holes(scene, target, irregular=True)
    dot_amplitude = min(1.0, (1.0 / scene.edge) ** 2)

    def propose():
        for centre in pick(4):
            spread = rng.uniform(4.0, 12.0)  # mm: holes of neighbouring secondary lobules
            n = 3 + rng.poisson(6)
            points = np.rint(centre + rng.normal(0.0, spread, (n, centre.size)) / scene.spacing)
            points = points.astype(int)
            points = points[_in_box(points, scene.shape)]
            points = points[scene.free[tuple(points.T)]]
            diameters = np.exp(rng.uniform(math.log(2.0), math.log(10.0), len(points)))
            for p, d in zip(points, diameters):
                has_dot = d >= 3.0 and rng.random() < 0.7
                yield dict(centre=p, radius=d / 2,
                           remaining=rng.uniform(*REMAINING["centrilobular"]),
                           stretch=_stretch(rng, p.size), dot=dot_amplitude * has_dot)

    _fill(holes, propose)
    holes.finish(dot_hu=rng.uniform(-600.0, -300.0))


def _paraseptal(scene: _Scene, target: int) -> None:
    """A subpleural row of cysts 5-20 mm along the lung surface (pleura, fissures), with thin
    walls formed by interlobular septa."""
    rng = scene.rng
    size = rng.uniform(2.5, 10.0)  # mm radius of this case's cysts
    band = scene.free & (scene.depth <= 0.8 * size + scene.spacing.max())
    points = np.argwhere(band)
    if len(points) == 0:
        return
    tree = cKDTree(points * scene.spacing)
    holes = _Holes(scene, target)

    def propose():
        starts = np.flatnonzero(holes.reach[tuple(points.T)] < -size)
        if starts.size == 0:
            return
        current = points[starts[rng.integers(starts.size)]]
        for _ in range(2 + rng.poisson(4)):
            radius = max(holes.fitting(float(np.clip(size * rng.uniform(0.75, 1.25), 2.5, 10.0))),
                         2.5)
            yield dict(centre=current, radius=radius,
                       remaining=rng.uniform(*REMAINING["paraseptal"]),
                       stretch=_stretch(rng, current.size), wall=0.6)
            near = np.asarray(tree.query_ball_point(current * scene.spacing, 2.4 * radius),
                              dtype=int)
            if near.size == 0:
                return
            gap = np.linalg.norm((points[near] - current) * scene.spacing, axis=1)
            # neighbours just touching, the shared wall being the septum; not inside a cyst
            near = near[(gap >= 1.9 * radius) & (holes.reach[tuple(points[near].T)] < -radius)]
            if near.size == 0:
                return
            current = points[near[rng.integers(near.size)]]

    _fill(holes, propose)
    holes.finish(wall_hu=rng.uniform(-750.0, -550.0))


def _bullous(scene: _Scene, target: int) -> None:
    """Bullae: air spaces > 1 cm (10-60 mm here), mostly subpleural, near -1000 HU, with a
    thin wall (< 1 mm: one voxel at about -700..-500 HU)."""
    rng = scene.rng
    holes = _Holes(scene, target)
    free = scene.free

    def propose():
        radius = max(holes.fitting(math.exp(rng.uniform(math.log(5.0), math.log(30.0)))), 5.0)
        depth = scene.depth
        if rng.random() < 0.8:
            where = free & (depth >= 0.3 * radius) & (depth <= 0.9 * radius)
        else:
            where = free & (depth > radius)
        where &= holes.reach < -radius  # may touch an earlier bulla, not lie inside it
        flat = np.flatnonzero(where)
        if flat.size:
            yield dict(centre=scene.coordinates(flat[rng.integers(flat.size)]), radius=radius,
                       remaining=rng.uniform(*REMAINING["bullous"]),
                       stretch=_stretch(rng, free.ndim), wall=1.0)

    _fill(holes, propose)
    holes.finish(wall_hu=rng.uniform(-700.0, -500.0))


# --- diffuse and published -----------------------------------------------------------------
def _panlobular(scene: _Scene, target: int) -> None:
    """Diffuse, gradual loss of 30-70 % of the tissue over large regions (lobules up to most
    of a lobe), lower-zone predominant; labelled where the pull is at least half."""
    rng = scene.rng
    free = scene.free
    score = _smooth_field(scene.shape, scene.spacing, rng.uniform(15.0, 30.0), rng)
    if scene.height is not None:
        score += 1.5 * (1.0 - scene.height)
    values = score[free]
    if values.size == 0:
        return
    threshold = float(np.partition(values, max(values.size - target, 0))[
        max(values.size - target, 0)])
    membership = np.clip(0.5 + (score - threshold) / 0.6, 0.0, 1.0)  # soft over several mm
    scene.blend(membership, scene.thinned(rng.uniform(*REMAINING["panlobular"])) + scene.texture)


def _worley(scene: _Scene, target: int) -> None:
    """The published lesions: 2^k seeds (k in 8..11) over the slice, distance to the nearest
    seed normalised to [0, 1], lesion where it exceeds 0.3, HU ~ N(-975, 5) truncated to
    [-1000, -951], hard edges. (The published random rotation of the noise image changes
    nothing for uniformly scattered seeds and is left out.) Whole cells are taken in random
    order until `target` voxels are covered; target = all eligible gives the published law."""
    rng = scene.rng
    shape = scene.shape
    spacing_px = math.sqrt(np.prod(scene.slice_shape) / 2 ** rng.integers(8, 12))
    n_seeds = max(1, round(np.prod(shape) / spacing_px ** len(shape)))
    seeds = np.ones(shape, dtype=bool)
    seeds[tuple(rng.integers(0, n, n_seeds) for n in shape)] = False
    distance, nearest = ndimage.distance_transform_edt(seeds, return_indices=True)
    candidate = (distance > 0.3 * distance.max()) & scene.free
    cell = np.ravel_multi_index(tuple(nearest), shape)[candidate]
    cells, counts = np.unique(cell, return_counts=True)
    order = rng.permutation(cells.size)
    taken = np.searchsorted(np.cumsum(counts[order]), target) + 1
    lesion = np.zeros(shape, dtype=bool)
    lesion[candidate] = np.isin(cell, cells[order[:taken]])
    values = rng.normal(-975.0, 5.0, int(lesion.sum()))
    bad = (values < -1000.0) | (values > -951.0)
    while bad.any():
        values[bad] = rng.normal(-975.0, 5.0, int(bad.sum()))
        bad = (values < -1000.0) | (values > -951.0)
    scene.out[lesion] = values
    scene.label |= lesion


_RENDER = {"worley": _worley, "centrilobular": _centrilobular, "paraseptal": _paraseptal,
           "panlobular": _panlobular, "bullous": _bullous}


# --- public API ----------------------------------------------------------------------------
def _lung_box(lungs) -> tuple[slice, ...]:
    """Bounding box of the lungs with one voxel of margin, so the lung surface lies inside
    (distance to the pleura)."""
    box = []
    for axis in range(lungs.ndim):
        idx = np.flatnonzero(lungs.any(axis=tuple(a for a in range(lungs.ndim) if a != axis)))
        box.append(slice(max(idx[0] - 1, 0), idx[-1] + 2))
    return tuple(box)


def synthesize_lesions(hu, lungs, spacing, rng, morphology: str, fraction: float | None = None,
                       *, keep_noise: bool = True, superior: int = 1):
    """Emphysema-like lesions in the lungs of `hu`; returns (hu_out float32, label uint8).

    morphology: one of MORPHOLOGIES or "mixed" (a random blend of the four clinical ones).
    fraction: share (0..1) of the eligible voxels (see eligible_voxels) to turn into lesion;
    None draws one log-uniformly in FRACTION_RANGE.
    keep_noise: lesion interiors keep the image's fine texture/noise (the published "worley"
    variant never does: it has a constant-density law).
    superior: +1 when the apex is towards higher z indices (LPS with identity direction, as
    SimpleITK reads axial series), -1 otherwise; used by the 3-D zone predominance only."""
    image, spacing = check_image(hu, spacing)
    lungs = np.asarray(lungs)
    if lungs.shape != image.shape:
        raise InputError(f"The lung mask {lungs.shape} does not match the image {image.shape}.")
    if morphology not in MORPHOLOGIES + ("mixed",):
        raise InputError(f"Unknown lesion morphology '{morphology}'; use one of "
                         f"{MORPHOLOGIES + ('mixed',)}.")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise InputError(f"The lesion fraction must be between 0 and 1, got {fraction}.")
    if superior not in (1, -1):
        raise InputError(f"superior must be +1 or -1 (direction of the apex along z), got "
                         f"{superior}.")
    rng = np.random.default_rng(rng)
    if fraction is None:
        fraction = math.exp(rng.uniform(*np.log(FRACTION_RANGE)))
    out = image.copy()
    label = np.zeros(image.shape, dtype=np.uint8)
    lungs = lungs != 0
    if not lungs.any():
        return out, label
    box = _lung_box(lungs)
    scene = _Scene(image[box], lungs[box], spacing, rng, keep_noise, superior,
                   image.shape[-2:])
    target = round(fraction * np.count_nonzero(scene.eligible))
    if target == 0:
        return out, label
    if morphology == "mixed":
        shares = rng.dirichlet(np.ones(len(CLINICAL)))
        for name, share in zip(CLINICAL, shares):
            if round(share * target) > 0:
                _RENDER[name](scene, round(share * target))
    else:
        _RENDER[morphology](scene, target)
    out[box] = np.maximum(scene.out, LOWEST_HU)
    label[box] = scene.label
    return out, label


def random_training_lesions(hu, lungs, spacing, rng, p_lesion: float = 0.9, *,
                            keep_noise: bool = True):
    """For training on slices: with probability p_lesion, lesions of a morphology drawn with
    TRAINING_WEIGHTS and a random fraction; else the slice unchanged and an empty label."""
    rng = np.random.default_rng(rng)
    if rng.random() >= p_lesion:
        image, _ = check_image(hu, spacing)
        return image.copy(), np.zeros(image.shape, dtype=np.uint8)
    names = list(TRAINING_WEIGHTS)
    weights = np.array([TRAINING_WEIGHTS[n] for n in names])
    morphology = names[rng.choice(len(names), p=weights / weights.sum())]
    return synthesize_lesions(hu, lungs, spacing, rng, morphology, keep_noise=keep_noise)
