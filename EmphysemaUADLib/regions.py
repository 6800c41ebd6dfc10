"""Regions of the lungs that get their own measurements and stage.

With a lobe segmentation (TotalSegmentator, lungmask, a legend) the regions are the lobes.
Without one each lung is cut into upper, middle and lower zones of equal
height (physical superior-inferior extent, whatever the volume's direction). They are zones,
never called lobes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .errors import InputError
from .lungs import LEFT, PADDING_HU, RIGHT, bounding_box
from .progress import NO_PROGRESS, Progress
from .volume_io import Geometry, Volume, is_volume_file, read_labels, to_image

ZONES = {
    1: "right upper zone", 2: "right middle zone", 3: "right lower zone",
    4: "left upper zone", 5: "left middle zone", 6: "left lower zone",
}


def superior_coordinate(index_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Physical S coordinate (LPS: +z is superior) of voxels given as (N, 3) z, y, x indices."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    ijk = index_zyx[:, ::-1].astype(np.float64) * np.asarray(geometry.spacing)
    return geometry.origin[2] + ijk @ direction[2]


MIN_ZONE_SLICES = 3  # a lung's height is cut in thirds only when each third has a slice


def lung_zones(lungs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Zone labels (keys of ZONES) from a lung mask with right = 1, left = 2. A lung seen on
    fewer than MIN_ZONE_SLICES axial slices (a single HRCT slice, say) has no height to
    divide and gets no zones: it is measured as a whole lung only."""
    zones = np.zeros(lungs.shape, dtype=np.uint8)
    for side, first_label in ((RIGHT, 1), (LEFT, 4)):
        idx = np.argwhere(lungs == side)
        if len(idx) == 0:
            continue
        if len(np.unique(idx[:, superior_axis(geometry)[0]])) < MIN_ZONE_SLICES:
            continue  # counted in slices: on a tilted grid S varies within one slice too
        s = superior_coordinate(idx, geometry)
        lo, hi = float(s.min()), float(s.max())
        # thirds of the height, from the top: upper, middle, lower
        third = np.clip(((hi - s) / max(hi - lo, 1e-6) * 3).astype(int), 0, 2)
        zones[tuple(idx.T)] = first_label + third
    return zones


def superior_axis(geometry: Geometry) -> tuple[int, bool]:
    """(numpy axis closest to superior-inferior, whether its index increases superiorly)."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    itk_index = int(np.argmax(np.abs(direction[2])))
    return 2 - itk_index, bool(direction[2, itk_index] > 0)


def in_plane_sigma(geometry: Geometry, mm: float) -> list[float]:
    """Gaussian sigmas (voxels) that smooth over `mm` within axial slices and not across."""
    axis = superior_axis(geometry)[0]
    return [0.0 if a == axis else mm / s for a, s in enumerate(geometry.spacing_zyx)]


def in_plane_cross(geometry: Geometry) -> np.ndarray:
    """A 3 x 3 x 3 structure joining voxels to their four neighbours within an axial slice."""
    axis = superior_axis(geometry)[0]
    cross = np.zeros((3, 3, 3), bool)
    cross[tuple(slice(None) if a != axis else 1 for a in range(3))] = \
        ndi.generate_binary_structure(2, 1)
    return cross


CUT_SHARE = 0.05  # an end slice holding this share of a region's largest cross-section cuts it


def cut_ends(mask: np.ndarray, geometry: Geometry) -> list[str]:
    """The ends of the scan where a region is cut off: "top" (superior) and/or "bottom"
    (inferior). A region is cut off at an end when the first or last slice holds more than
    CUT_SHARE of its largest cross-section (a costophrenic recess grazing the last slice of
    a complete scan does not count)."""
    axis, up = superior_axis(geometry)
    if not mask.any():
        return []
    area = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis))
    least = CUT_SHARE * area.max()
    first, last = bool(area[0] > least), bool(area[-1] > least)
    ends = {"top": last if up else first, "bottom": first if up else last}
    return [end for end in ("top", "bottom") if ends[end]]


# --- imported lobes ----------------------------------------------------------------------
LOBES = {1: "right upper lobe", 2: "right middle lobe", 3: "right lower lobe",
         4: "left upper lobe", 5: "left lower lobe"}
LOBE_CODES = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}
TOTALSEGMENTATOR_VALUES = {12: 1, 13: 2, 14: 3, 10: 4, 11: 5}
LTRC_VALUES = {3: 1, 4: 2, 5: 3, 1: 4, 2: 5}  # lungmask LTRCLobes: 1 LUL 2 LLL 3 RUL 4 RML 5 RLL
MIN_LUNG_COVERAGE = 0.5  # below this share of the lung the lobes do not belong to this CT
WARN_LUNG_COVERAGE = 0.9


CUT_SIDE_MM2 = 100.0  # contact with the field of view's edge, in mm2, that cuts a region


def field_edge(ct: np.ndarray, geometry: Geometry, near: np.ndarray) -> np.ndarray:
    """The edge of the field of view within the slices, where it can touch `near` (the
    lungs): the image's in-plane border and the voxels beside the scan-field padding (below
    PADDING_HU) within one voxel of near's bounding box."""
    axis = superior_axis(geometry)[0]
    edge = np.zeros(ct.shape, bool)
    for a in range(3):
        if a != axis:
            edge[tuple(slice(None) if b != a else [0, -1] for b in range(3))] = True
    if near.any():
        box = bounding_box(near, (1, 1, 1))
        padding = ct[box] < PADDING_HU
        if padding.any():
            edge[box] |= ndi.binary_dilation(padding, in_plane_cross(geometry)) & ~padding
    return edge


def cut_by_field(mask: np.ndarray, edge: np.ndarray, geometry: Geometry) -> bool:
    """Whether the field of view cuts a region within its slices (a small field of view, a
    cardiac CT): it lies on the field's `edge` over more than CUT_SIDE_MM2."""
    axis = superior_axis(geometry)[0]
    pixel = np.mean([s for a, s in enumerate(geometry.spacing_zyx) if a != axis])
    contact_mm2 = np.count_nonzero(mask & edge) * geometry.spacing_zyx[axis] * pixel
    return bool(contact_mm2 > CUT_SIDE_MM2)


def lobe_from_name(name: str) -> int | None:
    """Lobe label from names such as 'RUL', 'Right upper lobe', 'lung_upper_lobe_right',
    'upper lobe of left lung' (TotalSegmentator, Slicer segment names, legends)."""
    text = name.lower().replace("_", " ").replace("-", " ").replace(".nii.gz", "")
    text = text.replace(".nii", "").replace(".nrrd", "").strip()
    code = text.replace(" ", "").upper()
    for label, lobe_code in LOBE_CODES.items():
        if code == lobe_code:
            return label
    words = set(text.split())
    side = "right" if "right" in words else "left" if "left" in words else None
    level = next((w for w in ("upper", "middle", "lower") if w in words), None)
    if side is None or level is None or not words & {"lobe", "lung"}:
        return None
    for label, lobe_name in LOBES.items():
        if lobe_name == f"{side} {level} lobe":
            return label
    return None


def lobe_mapping(values: set[int], names: dict[int, str] | None, source: str,
                 hint: str = "") -> tuple[dict[int, int], str]:
    """(label value -> lobe label of LOBES, the convention found): by `names` (a legend,
    segment or colour names) when each names a lobe, else TotalSegmentator values 10-14, else
    lungmask LTRCLobes values 1-5; InputError naming `source` otherwise."""
    if names:
        lobes = {v: lobe_from_name(n) for v, n in names.items()}
        if all(lobes.values()):
            return lobes, "lobe names"
    if values & set(TOTALSEGMENTATOR_VALUES):
        return dict(TOTALSEGMENTATOR_VALUES), "TotalSegmentator labels 10-14"
    if values and values <= set(LTRC_VALUES):
        return dict(LTRC_VALUES), "lungmask LTRCLobes labels 1-5"
    raise InputError(f"{source}: labels {sorted(values)[:12]} are neither named after lobes "
                     f"nor TotalSegmentator (10-14) or lungmask (1-5) lobe values{hint}.")


def relabel(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """uint8 labels through `mapping` (value -> label); values it does not name become 0."""
    lut = np.zeros(max(int(labels.max(initial=0)), max(mapping, default=0)) + 1, np.uint8)
    for value, label in mapping.items():
        lut[value] = label
    return lut[np.clip(labels, 0, len(lut) - 1).astype(np.int64)]


def _same_grid(a: Geometry, b: Geometry, shape_a, shape_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and all(
        np.allclose(x, y, atol=1e-4) for x, y in
        ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def grid_difference(labels: Volume, ct: Volume) -> str:
    """What differs between two grids, with both values: "origin (..) vs the CT's (..)"."""
    a, b = labels.geometry, ct.geometry
    parts = [f"size {tuple(labels.shape[::-1])} vs the CT's {tuple(ct.shape[::-1])}"
             if tuple(labels.shape) != tuple(ct.shape) else ""]
    for name in ("origin", "spacing", "direction"):
        x, y = getattr(a, name), getattr(b, name)
        if not np.allclose(x, y, atol=1e-4):
            parts.append(f"{name} {_fmt(x)} vs the CT's {_fmt(y)}")
    return "; ".join(p for p in parts if p)


def _on_ct_grid(labels: Volume, ct: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the CT's grid, where they differ."""
    if _same_grid(labels.geometry, ct.geometry, labels.shape, ct.shape):
        return labels.array
    resampled = sitk.Resample(to_image(labels.array, labels.geometry),
                              to_image(np.zeros(ct.shape, np.uint8), ct.geometry),
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


def _legend_for(path: Path) -> dict[int, str] | None:
    for candidate in (path.with_name(path.name.split(".")[0] + ".json"),
                      path.with_suffix(".json")):
        if candidate.is_file():
            try:
                raw = json.loads(candidate.read_text())
                return {int(k): str(v if not isinstance(v, dict) else v.get("name", k))
                        for k, v in raw.items()}
            except (ValueError, AttributeError) as exc:
                raise InputError(f"{candidate}: not a legend of the form "
                                 f'{{"1": "right upper lobe", ...}} ({exc}).') from None
    return None


def read_regions(path: str | Path, ct: Volume, lungs: np.ndarray,
                 progress: Progress = NO_PROGRESS) -> tuple[np.ndarray, dict[int, str]]:
    """Regions from a lobe segmentation, on the CT's grid and inside the lungs.

    Accepts a TotalSegmentator multilabel file (lobes 10-14) or its folder of one file per
    lobe, lungmask LTRCLobes labels (1-5), or any label map with a JSON legend beside it
    (same name, .json); lobe names in a legend are recognised, other names kept as given.
    """
    path = Path(path)
    differs = ""
    if path.is_dir() and any(lobe_from_name(p.name) for p in path.iterdir()):
        regions = np.zeros(ct.shape, np.uint8)
        found = []
        for file in sorted(path.iterdir()):
            label = lobe_from_name(file.name)
            if label and is_volume_file(file):
                mask = read_labels(file, "lobe mask")
                differs = differs or grid_difference(mask, ct)
                regions[_on_ct_grid(mask, ct) > 0] = label
                found.append(LOBE_CODES[label])
        legend = dict(LOBES)
        source = f"one file per lobe ({', '.join(found)})"
    else:
        volume = read_labels(path, "lobe segmentation")
        differs = grid_difference(volume, ct)
        values = set(np.unique(volume.array).tolist()) - {0}
        legend_in = _legend_for(path)
        if legend_in is not None and not all(map(lobe_from_name, legend_in.values())):
            mapping = {v: i + 1 for i, v in enumerate(sorted(legend_in))}
            legend = {mapping[v]: legend_in[v] for v in sorted(legend_in)}
            source = "label map with a legend"
        else:
            mapping, source = lobe_mapping(values, legend_in, str(path),
                                           "; add a JSON legend beside it (same name, .json) "
                                           "naming each label")
            legend = dict(LOBES)
        regions = relabel(_on_ct_grid(volume, ct), mapping)
    lung = lungs > 0
    covered = np.count_nonzero(regions[lung]) / max(np.count_nonzero(lung), 1)
    if covered < MIN_LUNG_COVERAGE:
        grid = (f" Its grid differs from the CT's: {differs}." if differs else
                " It is on the CT's own grid.")
        raise InputError(f"{path}: the lobe segmentation covers only {covered:.0%} of the lungs "
                         "found in this CT; it does not belong to this CT or its geometry "
                         f"(origin, spacing, direction) is wrong.{grid}")
    if covered < WARN_LUNG_COVERAGE:
        progress.log(f"{path}: the lobes cover {covered:.0%} of the lungs; the rest counts "
                     "only in the whole-lung and left/right measurements.")
    progress.log(f"regions from {path} ({source}).")
    regions = np.where(lung, regions, 0).astype(np.uint8)
    present = set(np.unique(regions).tolist()) - {0}
    return regions, {k: v for k, v in legend.items() if k in present}
