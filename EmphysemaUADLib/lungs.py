"""Lung mask with right (1) and left (2) labels by classical image processing, no weights.

The work runs in a canonical orientation taken from the direction matrix (slices from head to
feet, rows from anterior to posterior, columns from patient right to left; ITK's LPS puts
patient left at +x), so no rule depends on how the file stores its axes:

1. in-plane block average to about 2 mm (the heavy morphology runs there); air is below
   -500 HU after a 1 mm Gaussian, the midpoint between air and soft tissue, which holds
   across kernels and noise;
2. air reached from the image border or from the scan-field padding within its slice is
   outside the body (the table's air too);
3. the trachea and main bronchi (round air sections near the mid-line forming a tube) are
   followed slice by slice and removed until they enter the lung (their section then grows
   into the lung's);
4. air pockets inside the body of mostly lung densities are lungs; pure-air pockets (bowel
   gas, table) are not, unless one is the only candidate on a side of the body (a lung with
   severe emphysema) or a wall of a few mm separates it from a lung (a bulla);
   where the field of view cuts a lung, its sections that reach the image border passed for
   outside air in step 2: those at lung density that touch the lungs found join them (the
   table's mattress is as dense, but no lung touches it);
5. right and left: in-plane erosion until two large parts lie far apart, then every lung
   voxel goes to the nearer part (to the mid-line's side where the lungs merge widely);
6. per lung, closing with a 12 mm ball except between the lungs (pleural nodules, not the
   heart and hila) and per-slice hole filling (vessels, nodules, tumours);
7. at full resolution, the boundary is the -500 HU edge within one coarse pixel of the
   coarse mask, whose interior and added tissue are kept.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import permutations

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .volume_io import Geometry, Volume

RIGHT, LEFT = 1, 2
ROI = 3  # the lung of an ROI of parenchyma (roi.py): neither the right nor the left lung
LUNG_NAMES = {RIGHT: "right lung", LEFT: "left lung", ROI: "ROI lung"}
AIR_HU = -500.0
PADDING_HU = -1500.0        # below: outside the scanner's field of view (-2048, -3024 ...)
COARSE_MM = 2.0             # in-plane spacing of the coarse grid
SMOOTH_MM = 1.0             # Gaussian sigma on the coarse grid (noise, sharp kernels)
FINE_SMOOTH_MM = 0.5        # Gaussian sigma for the full-resolution boundary
PARENCHYMA_HU = -950.0      # lung tissue is denser than this; bowel gas and table air are not
MIN_PARENCHYMA_SHARE = 0.5  # of a pocket's voxels, for it to count as lung by density
SIDE_SHARE = 0.2            # of a pocket's voxels on a side, for that side to hold a lung
GAS_LUNG_SHARE = 0.25       # an air-only lung is at least this share of the largest lung
MIN_LUNG_SHARE = 0.05       # a lung-dense pocket smaller than this share of the largest
                            # pocket is a bowel bubble
MIN_LUNG_ML = 0.5           # smaller pockets are noise
BULLA_WALL_MM = 3.0         # thickest wall between a lung and a pure-air pocket taken in
CLOSING_MM = 12.0           # ball radius of the closing (nodules on the pleura)
# trachea and main bronchi: section area, distance of a seed from the body's mid-line
AIRWAY_MM2 = (20.0, 900.0)
AIRWAY_MIDLINE_MM = 25.0
AIRWAY_SEED_HU = -750.0
AIRWAY_SEED_MM = 20.0       # a seed must stay a tube for this length (or the whole scan)
SPLIT_STEP_MM = 2.0
SPLIT_MAX_MM = 30.0
SPLIT_MIN_SHARE = 0.1       # each part of a split holds at least this share of the lungs
SPLIT_MIN_DX_MM = 40.0      # the two parts' centres lie this far apart from right to left

_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True


def lung_legend(lungs: np.ndarray) -> dict[int, str]:
    """{label: name} of the lung labels present in `lungs`."""
    counts = np.bincount(np.asarray(lungs, np.uint8).ravel(), minlength=len(LUNG_NAMES) + 1)
    return {value: name for value, name in LUNG_NAMES.items() if counts[value]}


def one_lung_note(lungs: np.ndarray) -> str | None:
    """A line for a scan where only one lung was found, else None."""
    present = lung_legend(lungs)
    if (RIGHT in present) == (LEFT in present):
        return None
    found, other = ("right", "left") if RIGHT in present else ("left", "right")
    return (f"Only the {found} lung was found: no {other} lung at lung density in this scan "
            f"(collapsed, filled, resected or outside the field); the whole lung is the "
            f"{found} lung.")


def segment_lungs(ct: Volume) -> np.ndarray:
    """Lung labels in the CT's own (z, y, x) grid: 0 background, 1 right lung, 2 left lung."""
    if ct.array.ndim != 3:
        raise InputError(f"{ct.source or 'the CT'}: lung segmentation needs a 3-D volume, "
                         f"not an array of shape {ct.array.shape}.")
    axes, flips = _canonical_axes(ct.geometry)
    hu = _to_canonical(ct.array, axes, flips)
    spacing = tuple(float(ct.geometry.spacing_zyx[a]) for a in axes)
    labels = _segment_canonical(hu, spacing)
    return _from_canonical(labels, axes, flips).astype(np.uint8)


# --- orientation ---------------------------------------------------------------------------
def _canonical_axes(geometry: Geometry) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The array axis that becomes each canonical axis (head->feet, anterior->posterior,
    right->left) and whether it must be reversed, from the direction matrix."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    # direction[:, c] is the physical direction of ITK index axis c = array axis 2 - c;
    # canonical axis k follows physical axis (z, y, x)[k] = row 2 - k of the matrix
    def cosine(k, axis):
        return direction[2 - k, 2 - axis]
    axes = max(permutations(range(3)), key=lambda p: sum(abs(cosine(k, a)) for k, a in
                                                           enumerate(p)))
    # LPS: +z superior (canonical runs inferior), +y posterior, +x left
    flips = (cosine(0, axes[0]) > 0, cosine(1, axes[1]) < 0, cosine(2, axes[2]) < 0)
    return axes, flips


def _to_canonical(array, axes, flips):
    out = np.transpose(array, axes)
    return out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _from_canonical(array, axes, flips):
    out = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.ascontiguousarray(np.transpose(out, np.argsort(axes)))


# --- the pipeline --------------------------------------------------------------------------
def _segment_canonical(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    factors = tuple(max(1, int(round(COARSE_MM / s))) for s in spacing[1:])
    coarse, padding = _block_mean(hu, factors)
    cspacing = (spacing[0], spacing[1] * factors[0], spacing[2] * factors[1])
    smooth = ndi.gaussian_filter(coarse, (0, SMOOTH_MM / cspacing[1], SMOOTH_MM / cspacing[2]))
    air = (smooth < AIR_HU) & ~padding
    outside = outside_air(air, padding)
    inside = air & ~outside
    body = ~(outside | padding)
    airways = _airways(inside, smooth, body, cspacing)
    lungs = _lung_pockets(inside & ~airways, smooth, body, cspacing)
    lungs = _join_cut_lungs(lungs, outside, inside & ~airways, smooth)
    body |= lungs
    labels = _split_sides(lungs, body, cspacing)
    closed = np.where(airways, 0, _close_and_fill(labels, cspacing))
    return _refine(closed, closed.astype(bool) & ~lungs, hu, spacing, factors)


def _block_mean(hu: np.ndarray, factors: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """In-plane block means (padding counted as air) and the blocks that touch padding."""
    fy, fx = factors
    nz, ny, nx = hu.shape
    py, px = -ny % fy, -nx % fx
    if py or px:
        hu = np.pad(hu, ((0, 0), (0, py), (0, px)), mode="edge")
    shape = (nz, (ny + py) // fy, (nx + px) // fx)
    total = np.zeros(shape, np.float32)
    padding = np.zeros(shape, bool)
    for dy in range(fy):  # strided sums: far faster than a reshape of a flipped view
        for dx in range(fx):
            part = hu[:, dy::fy, dx::fx]
            total += np.maximum(part, -1024.0)
            padding |= part < PADDING_HU
    return total / (fy * fx), padding


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Per-slice hole filling (background not connected to the slice's border within it);
    labelling the background is several times faster than binary_fill_holes here."""
    labels, n = ndi.label(~mask, _IN_PLANE)
    background = np.zeros(n + 1, bool)
    for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        background[face] = True
    background[0] = False
    return ~background[labels]


def outside_air(air: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """Air connected, within its slice, to the image border or to the scan-field padding
    (z, y, x masks; also calibration.py's air outside the body)."""
    labels, n = ndi.label(air, _IN_PLANE)
    touching = np.zeros(n + 1, bool)
    for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        touching[face] = True
    touching[labels[ndi.binary_dilation(padding, _IN_PLANE)]] = True
    touching[0] = False
    return touching[labels]


def _airways(inside: np.ndarray, smooth: np.ndarray, body: np.ndarray,
             spacing: tuple[float, float, float]) -> np.ndarray:
    """Trachea and main bronchi: round air sections near the body's mid-line that form a
    tube, followed down (and up) slice by slice while the section stays airway-sized."""
    labels, n = ndi.label(inside, _IN_PLANE)
    if n == 0:
        return np.zeros_like(inside)
    area = np.bincount(labels.ravel(), minlength=n + 1) * (spacing[1] * spacing[2])
    mean_hu = np.zeros(n + 1)
    mean_hu[1:] = ndi.mean(smooth, labels, np.arange(1, n + 1))
    boxes = np.array([[b[0].start, b[1].start, b[1].stop, b[2].start, b[2].stop]
                      for b in ndi.find_objects(labels)])
    h = (boxes[:, 2] - boxes[:, 1]) * spacing[1]
    w = (boxes[:, 4] - boxes[:, 3]) * spacing[2]
    centre = (boxes[:, 3] + boxes[:, 4] - 1) / 2.0
    off_centre = (centre - _midlines(body)[boxes[:, 0]]) * spacing[2]
    is_seed = np.zeros(n + 1, bool)
    is_seed[1:] = ((AIRWAY_MM2[0] <= area[1:]) & (area[1:] <= AIRWAY_MM2[1])
                   & (mean_hu[1:] <= AIRWAY_SEED_HU)
                   & (area[1:] >= 0.5 * h * w) & (np.maximum(h, w) <= 2.0 * np.minimum(h, w))
                   & (np.abs(off_centre) <= AIRWAY_MIDLINE_MM))
    nz = inside.shape[0]
    run = max(1, min(int(np.ceil(AIRWAY_SEED_MM / spacing[0])), nz))
    airway = np.zeros(n + 1, bool)
    for z in range(nz):
        for i in np.unique(labels[z][is_seed[labels[z]]]):
            if airway[i]:
                continue
            tube = _follow(labels, area, i, z, 1, limit=run, allowed=is_seed)
            if len(tube) < run and z + len(tube) < nz:
                continue
            for step in (1, -1):
                for found in _follow(labels, area, i, z, step):
                    airway[list(found)] = True
    return airway[labels]


def _follow(labels, area, start, z, step, limit=None, allowed=None) -> list[set[int]]:
    """The 2-D components linked to component `start` of slice z, slice after slice in the
    direction `step`, while a section stays below twice the one it continues (a bronchus
    that enters the lung merges with the lung's much larger section: the tracking stops)."""
    chain = [{start}]
    while (limit is None or len(chain) < limit) and 0 <= z + step < labels.shape[0]:
        rows, cols = np.nonzero(np.isin(labels[z], list(chain[-1])))
        box = (slice(max(rows.min() - 1, 0), rows.max() + 2),
               slice(max(cols.min() - 1, 0), cols.max() + 2))
        previous = np.isin(labels[z][box], list(chain[-1]))
        before = sum(area[j] for j in chain[-1])
        touching = labels[z + step][box][ndi.binary_dilation(previous)]
        found = {int(j) for j in np.unique(touching) if j
                 and area[j] <= min(AIRWAY_MM2[1], 2.0 * before + 30.0)
                 and (allowed is None or allowed[j])}
        if not found:
            break
        chain.append(found)
        z += step
    return chain


def _lung_pockets(inside: np.ndarray, smooth: np.ndarray, body: np.ndarray,
                  spacing: tuple[float, float, float]) -> np.ndarray:
    """The air pockets inside the body that are lungs.

    A pocket mostly of lung densities (above -950 HU) is lung. A pocket of nearly pure air is
    bowel gas or the table's, unless (a) it is the largest such pocket on a side of the body
    where no lung-dense pocket lies, at the height of the lungs found (a lung with severe
    emphysema; the largest of all when none is found), or (b) a wall of a few mm at most
    separates it from a lung (a bulla)."""
    labels, n = ndi.label(inside)
    if n == 0:
        return np.zeros_like(inside)
    flat = labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n + 1), 1).astype(np.float64)
    volume = count * (float(np.prod(spacing)) / 1000.0)
    volume[0] = 0.0
    dense = _dense_share(labels, n, smooth)
    # share of each pocket on the patient's left of the body's mid-line, slice by slice
    on_left = np.arange(body.shape[2])[None, None, :] > _midlines(body)[:, None, None]
    left = np.bincount(flat, weights=np.broadcast_to(on_left, labels.shape).ravel(),
                       minlength=n + 1) / count
    z_range = [(0, 0)] + [(b[0].start, b[0].stop) for b in ndi.find_objects(labels)]
    sizeable = volume >= MIN_LUNG_ML
    keep = np.zeros(n + 1, bool)
    # lung-dense pockets far smaller than the largest pocket are bowel bubbles
    dense_ones = (sizeable & (dense >= MIN_PARENCHYMA_SHARE)
                  & (volume >= MIN_LUNG_SHARE * volume.max()))
    if dense_ones.any():
        largest = int(np.argmax(np.where(dense_ones, volume, -1.0)))
        keep[largest] = True
        # other lung-dense pockets at the height of the largest (bowel bubbles lie lower)
        for i in np.flatnonzero(dense_ones):
            keep[i] |= (volume[i] >= MIN_LUNG_SHARE * volume[largest]
                        and _overlap(z_range[i], z_range[largest]) >= 0.5)
    for side_share in (1.0 - left, left):
        if (keep & (side_share >= SIDE_SHARE)).any():
            continue
        candidates = sizeable & ~keep & (side_share >= 0.5)
        if keep.any():
            span = (min(z_range[i][0] for i in np.flatnonzero(keep)),
                    max(z_range[i][1] for i in np.flatnonzero(keep)))
            biggest = volume[keep].max()
            for i in np.flatnonzero(candidates):
                candidates[i] = (_overlap(z_range[i], span) >= 0.5
                                 and volume[i] >= GAS_LUNG_SHARE * biggest)
        if candidates.any():
            keep[np.argmax(np.where(candidates, volume, -1.0))] = True
    lungs = keep[labels]
    if lungs.any():
        # a wall of BULLA_WALL_MM, or of one pixel where pixels are larger, then the pocket
        pixel = min(spacing[1:])
        disk = _disk(max(BULLA_WALL_MM, pixel) + pixel, spacing)
        box = bounding_box(lungs, (0,) + disk.shape[1:])
        near = ndi.binary_dilation(lungs[box], disk)
        bullae = np.unique(labels[box][near & ~lungs[box]])
        keep[bullae[sizeable[bullae] & (dense[bullae] < MIN_PARENCHYMA_SHARE)]] = True
    keep[0] = False
    return keep[labels]


def _join_cut_lungs(lungs: np.ndarray, outside: np.ndarray, inside: np.ndarray,
                    smooth: np.ndarray) -> np.ndarray:
    """The lungs with their parts cut by the field of view: the in-plane sections of
    `outside` air mostly at lung density, and the lung-dense pockets only those sections link
    to the lungs, where they touch the lungs in 3-D."""
    if not lungs.any():
        return lungs
    candidates = np.zeros_like(lungs)
    for air, structure in ((outside, _IN_PLANE), (inside & ~lungs, None)):
        labels, n = ndi.label(air, structure)
        dense = _dense_share(labels, n, smooth) >= MIN_PARENCHYMA_SHARE
        dense[0] = False
        candidates |= dense[labels]
    if not candidates.any():
        return lungs
    joined, _ = ndi.label(lungs | candidates)
    reached = np.zeros(joined.max() + 1, bool)
    reached[joined[lungs]] = True
    return reached[joined]


def _dense_share(labels: np.ndarray, n: int, smooth: np.ndarray) -> np.ndarray:
    """Per label 0..n, the share of its voxels at lung density (above PARENCHYMA_HU)."""
    count = np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1)
    return np.bincount(labels.ravel(), weights=(smooth > PARENCHYMA_HU).ravel(),
                       minlength=n + 1) / count


def _overlap(inner: tuple[int, int], outer: tuple[int, int]) -> float:
    """Share of the slice range `inner` that lies within `outer`."""
    shared = min(inner[1], outer[1]) - max(inner[0], outer[0])
    return max(0, shared) / max(inner[1] - inner[0], 1)


def _in_threads(function, items) -> list:
    """[function(item) for item in items], one thread each: scipy.ndimage's distance
    transforms release the GIL, so the two lungs' run side by side on two cores."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(function, items))


def _disk(radius_mm: float, spacing) -> np.ndarray:
    """In-plane disk structuring element (one slice thick)."""
    ry, rx = (int(radius_mm // s) for s in spacing[1:])
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disk = (y * spacing[1]) ** 2 + (x * spacing[2]) ** 2 <= radius_mm ** 2
    return disk[None]


def bounding_box(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, ...]:
    """Slices of a non-empty mask's bounding box, `margin` voxels wider per axis, within it."""
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))
           for k in range(3)]
    return tuple(slice(max(int(i[0]) - m, 0), min(int(i[-1]) + 1 + m, size))
                 for i, m, size in zip(idx, margin, mask.shape))


def _split_sides(lungs: np.ndarray, body: np.ndarray,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """Right (1) / left (2) labels: erode in-plane until two large parts lie far apart from
    right to left (the lungs may touch at the anterior or posterior junction), then give
    every lung voxel to the nearer part. One part only: one lung, on its side of the body."""
    labels = np.zeros(lungs.shape, np.uint8)
    if not lungs.any():
        return labels
    box = bounding_box(lungs, (0, 1, 1))
    sub = lungs[box]
    depth = ndi.distance_transform_edt(sub, sampling=(1e6, spacing[1], spacing[2]))
    for radius in np.arange(0.0, SPLIT_MAX_MM + 1e-6, SPLIT_STEP_MM):
        parts, n = ndi.label(depth > radius)
        if n < 2:
            if n == 0:
                break
            continue
        size = np.bincount(parts.ravel())
        size[0] = 0
        a, b = np.argsort(size)[::-1][:2]
        if size[b] < SPLIT_MIN_SHARE * size[a]:
            continue
        cols = np.arange(sub.shape[2])
        ca, cb = (float((parts == k).sum(axis=(0, 1)) @ cols) / size[k] for k in (a, b))
        if abs(ca - cb) * spacing[2] < SPLIT_MIN_DX_MM:
            continue
        right, left = (a, b) if ca < cb else (b, a)
        d_right, d_left = _in_threads(
            lambda k: ndi.distance_transform_edt(parts != k, sampling=spacing), (right, left))
        # where the lungs merge over a wide zone (erosion had to go deep), side with the
        # body's mid-line unless one part is clearly nearer
        beyond = (cols[None, None, :] + box[2].start) - _midlines(body)[box[0], None, None]
        d_right += radius * (beyond > 0)
        d_left += radius * (beyond < 0)
        labels[box] = np.where(sub, np.where(d_right <= d_left, RIGHT, LEFT), 0)
        return labels
    rows = np.flatnonzero(lungs.any(axis=(1, 2)))
    centre = float(lungs.sum(axis=(0, 1)) @ np.arange(lungs.shape[2])) / lungs.sum()
    labels[lungs] = RIGHT if centre < _midline(body[rows]) else LEFT
    return labels


def _midline(body: np.ndarray) -> float:
    """Column of the body's right-left centre of mass over the given slices."""
    counts = body.sum(axis=(0, 1))
    total = counts.sum()
    return float(counts @ np.arange(body.shape[2])) / total if total else body.shape[2] / 2.0


def _midlines(body: np.ndarray) -> np.ndarray:
    """Column of the body's right-left centre of mass in each slice."""
    counts = body.sum(axis=1).astype(np.float64)
    total = counts.sum(axis=1)
    centre = counts @ np.arange(body.shape[2]) / np.maximum(total, 1)
    return np.where(total > 0, centre, _midline(body))


def _close_and_fill(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per lung: closing with a ball (nodules on the pleura), except between the lungs where
    it would fill the notches of the heart, aorta and hila; then per-slice hole filling
    (vessels, nodules, tumours surrounded by lung)."""
    out = labels.copy()
    between = _between_lungs(labels)
    margin = tuple(int(np.ceil(CLOSING_MM / s)) + 1 for s in spacing)

    def closed(side):
        mask = labels == side
        if not mask.any():
            return None
        box = bounding_box(mask, margin)
        # beyond the image's in-plane border is not lung: a lung the field of view cuts is not
        # closed along it (beyond the first and last slices the lungs go on, as before)
        pad = [(0, 0)] + [(m * (b.start == 0), m * (b.stop == n))
                          for m, b, n in zip(margin[1:], box[1:], mask.shape[1:])]
        sub = np.pad(mask[box], pad)
        # dilation then erosion by distance maps: exact balls in mm, at any spacing
        grown = ndi.distance_transform_edt(~sub, sampling=spacing) <= CLOSING_MM
        shut = ndi.distance_transform_edt(grown, sampling=spacing) > CLOSING_MM
        shut = shut[tuple(slice(a, a + n) for (a, _), n in zip(pad, mask[box].shape))]
        return box, _fill_holes(shut | mask[box]) & ~between[box]

    for side, done in zip((RIGHT, LEFT), _in_threads(closed, (RIGHT, LEFT))):
        if done is not None:  # in this order: a voxel both closings add goes to the left lung
            box, sub = done
            out[box][sub & (labels[box] == 0)] = side
    return out


def _between_lungs(labels: np.ndarray) -> np.ndarray:
    """Voxels of each image row that lie between the right lung and the left lung."""
    columns = np.arange(labels.shape[2])
    right_edge = np.where(labels == RIGHT, columns, -1).max(axis=2)
    left_edge = np.where(labels == LEFT, columns, labels.shape[2]).min(axis=2)
    return ((columns > right_edge[..., None]) & (columns < left_edge[..., None])
            & (right_edge >= 0)[..., None] & (left_edge < labels.shape[2])[..., None])


def _refine(labels: np.ndarray, added: np.ndarray, hu: np.ndarray,
            spacing: tuple[float, float, float], factors: tuple[int, int]) -> np.ndarray:
    """Full-resolution labels: the -500 HU boundary within one coarse pixel of the coarse
    lungs, plus their interior and the tissue that closing and hole filling added (vessels,
    nodules); holes filled per slice and lung."""
    out = np.zeros(hu.shape, np.uint8)
    if not labels.any():
        return out
    fy, fx = factors
    box = bounding_box(labels > 0, (0, 2, 2))
    sub = labels[box]
    mask = sub > 0
    grow = ndi.binary_dilation(mask, _IN_PLANE_8)
    core = ndi.binary_erosion(mask, _IN_PLANE_8, border_value=1) | added[box]
    # the rim gets the label next to it (either, where both lungs touch)
    nearest = np.where(mask, sub, ndi.grey_dilation(sub, footprint=_IN_PLANE_8))
    fine = (box[0], slice(box[1].start * fy, min(box[1].stop * fy, hu.shape[1])),
            slice(box[2].start * fx, min(box[2].stop * fx, hu.shape[2])))
    fine_hu = hu[fine]
    shape = fine_hu.shape

    def up(a):
        return np.repeat(np.repeat(a, fy, axis=1), fx, axis=2)[:, :shape[1], :shape[2]]

    sigma = (0, FINE_SMOOTH_MM / spacing[1], FINE_SMOOTH_MM / spacing[2])
    air = ndi.gaussian_filter(fine_hu.astype(np.float32), sigma) < AIR_HU
    air &= fine_hu > PADDING_HU
    result = np.where((air & up(grow)) | up(core), up(nearest), 0).astype(np.uint8)
    for side in (RIGHT, LEFT):
        side_mask = result == side
        if side_mask.any():
            side_box = bounding_box(side_mask, (0, 1, 1))
            filled = _fill_holes(side_mask[side_box])
            result[side_box][filled & (result[side_box] == 0)] = side
    out[fine] = result
    return out
