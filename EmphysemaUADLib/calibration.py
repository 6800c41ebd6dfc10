"""Is the scan's HU scale where it should be? Air outside the body reads -1000 HU on a
calibrated scanner and subcutaneous fat about -100 HU. A scale shifted as a whole (a wrong
rescale intercept, an export that added a constant) moves both by the same amount, and moves
every density measure (LAA-950, Perc15) and what the network sees with them: the real HRCT
slices of ../shared/data read air at -922 HU and fat at -24 HU, a shift of +77 HU.

`check_hu` measures the shift; `detect --correct-hu` subtracts it. The check needs air
outside the body, clear of it and of the scan-field padding, so a field of view cut to the
body cannot be checked (and is not corrected)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .lungs import AIR_HU as BODY_ABOVE_HU, PADDING_HU, outside_air
from .regions import superior_axis
from .volume_io import Volume, roi_sized

AIR_HU, FAT_HU = -1000.0, -100.0
TOLERANCE_HU = 20.0      # air within this of -1000 HU: calibrated (noise, scatter, kernels)
AGREEMENT_HU = 30.0      # fat's shift must match air's: a whole-scale shift, not air alone
AIR_SEARCH_HU = 150.0    # air's peak is looked for this far around -1000 HU
FAT_SEARCH_HU = 40.0     # fat's peak: looked for this far beyond -100 HU and air's shift
BODY_AT_BORDER = 0.25    # share of the image border the body (and table) may cover
CLEAR_OF_BODY_MM = 10.0  # air this close to the body is raised by its streaks and blur
FAT_SHELL_MM = 30.0      # subcutaneous fat lies within this depth of the skin
# fat is sampled this far from air (outside or in the lungs): the blur across an air-tissue
# edge passes through fat's range, and in a thin patient, whose lungs lie close under the
# skin, noise turns that ramp into a false fat peak that contradicts the shift
FAT_CLEAR_OF_AIR_MM = 5.0
FAT_SMOOTH_MM = 1.5
CHECK_SLICES = 12
MIN_VOXELS = 2000        # for a histogram peak


@dataclass(frozen=True)
class HuCheck:
    air_hu: float | None   # peak of air outside the body; None: none clear of the body
    fat_hu: float | None   # peak of the body's outer 3 cm, clear of air, near fat; None: no peak
    shift_hu: float | None  # the scale's shift (air_hu + 1000) when air and fat agree on one

    @property
    def shifted(self) -> bool:
        return self.shift_hu is not None

    def describe(self) -> str:
        if self.air_hu is None:
            return "HU scale not checked (no air outside the body in the field of view)"
        fat = "" if self.fat_hu is None else f", fat {self.fat_hu:.0f} HU"
        return f"air outside the body {self.air_hu:.0f} HU{fat}"

    def as_dict(self) -> dict:
        return {"air_hu": self.air_hu, "fat_hu": self.fat_hu, "shift_hu": self.shift_hu}


def check_hu(ct: Volume) -> HuCheck:
    """The shift of the CT's HU scale, from air outside the body and subcutaneous fat in up
    to CHECK_SLICES axial slices; shift_hu is None when air reads within TOLERANCE_HU of
    -1000 HU, or when fat's peak contradicts a whole-scale shift. An image the size of an
    ROI of parenchyma (roi.py) is not checked: it shows no body to find either in."""
    if roi_sized(ct.shape, ct.geometry.spacing_zyx):
        return HuCheck(None, None, None)
    axis, _ = superior_axis(ct.geometry)
    hu = np.moveaxis(ct.array, axis, 0)
    spacing = [s for a, s in enumerate(ct.geometry.spacing_zyx) if a != axis]
    picks = np.linspace(0, hu.shape[0] - 1, min(CHECK_SLICES, hu.shape[0])).astype(int)
    air, shell = [], []
    for z in np.unique(picks):
        image = hu[z].astype(np.float32)
        outside, fat_shell = _slice_parts(image, spacing)
        air.append(image[outside])
        # fat's peak drowns in a sharp kernel's noise unless smoothed over a few mm
        soft = ndimage.gaussian_filter(np.maximum(image, AIR_HU),
                                       [FAT_SMOOTH_MM / s for s in spacing])
        shell.append(soft[fat_shell])
    # the histogram peaks: streaks from the table and the arms raise part of the air
    air_hu = _peak(np.concatenate(air), AIR_HU - AIR_SEARCH_HU, AIR_HU + AIR_SEARCH_HU)
    if air_hu is None:
        return HuCheck(None, None, None)
    shift = air_hu - AIR_HU
    # fat is looked for where air puts it and where it belongs, so that it can contradict
    fat_hu = _peak(np.concatenate(shell), FAT_HU + min(shift, 0.0) - FAT_SEARCH_HU,
                   FAT_HU + max(shift, 0.0) + FAT_SEARCH_HU)
    # fat without a clear peak (a thin patient, one noisy slice) leaves it to air
    whole_scale = fat_hu is None or abs(fat_hu - FAT_HU - shift) <= AGREEMENT_HU
    return HuCheck(air_hu, fat_hu, round(shift, 1)
                   if abs(shift) > TOLERANCE_HU and whole_scale else None)


def corrected(ct: Volume, check: HuCheck) -> Volume:
    """The CT with its HU scale's shift taken off (float32); the CT itself when unshifted."""
    if not check.shifted:
        return ct
    return replace(ct, array=ct.array.astype(np.float32) - np.float32(check.shift_hu))


def _slice_parts(image: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(air outside the body clear of body and padding, the body's outer shell clear of
    air) of a slice; both empty where the body reaches the image border widely (a field of
    view cut through the body, where lung touching the border would pass for outside air)."""
    padding = image < PADDING_HU
    floor = image.min()
    if floor <= AIR_HU:  # a field-of-view border stored as a constant such as -1024 HU: the
        # large floor regions at the image border (not air clipped at the floor by noise)
        floor_regions = ndimage.binary_opening(image == floor, iterations=2)
        padding |= _at_border(floor_regions, np.zeros_like(floor_regions))
    smooth = ndimage.gaussian_filter(image, 1.0)
    dense = smooth >= BODY_ABOVE_HU
    body_like = dense & ~padding
    rim = np.concatenate([body_like[0], body_like[-1], body_like[:, 0], body_like[:, -1]])
    if np.count_nonzero(rim) > BODY_AT_BORDER * rim.size:
        nothing = np.zeros(image.shape, bool)
        return nothing, nothing
    outside = _at_border(~dense & ~padding, padding)
    body = ~(outside | padding)
    clear = (ndimage.distance_transform_edt(~body, sampling=spacing) > CLEAR_OF_BODY_MM) & \
        (ndimage.distance_transform_edt(~padding, sampling=spacing) > 2.0)
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    clear_of_air = ndimage.distance_transform_edt(dense, sampling=spacing) > FAT_CLEAR_OF_AIR_MM
    # air clipped at the stored floor would pile up in one histogram bin
    unclipped = image > floor if floor <= AIR_HU else True
    return outside & clear & unclipped, body & (depth <= FAT_SHELL_MM) & clear_of_air


def _at_border(mask: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """The connected parts of a slice's `mask` that touch the image border or `padding`."""
    return outside_air(mask[None], padding[None])[0]


def _peak(values: np.ndarray, low: float, high: float) -> float | None:
    """The highest local maximum of the smoothed histogram (4 HU bins) within [low, high]:
    a peak there, not the flank of a larger one outside; None without one or with too few
    values."""
    inside = values[(values >= low - 20) & (values <= high + 20)]
    if inside.size < MIN_VOXELS:
        return None
    counts, edges = np.histogram(inside, bins=np.arange(low - 20, high + 24, 4.0))
    counts = ndimage.gaussian_filter1d(counts.astype(np.float64), 3.0)
    i = np.arange(5, len(counts) - 5)  # not in the 20 HU margins on each side
    maxima = i[(counts[i] > counts[i - 1]) & (counts[i] >= counts[i + 1])]
    if maxima.size == 0:
        return None
    peak = maxima[np.argmax(counts[maxima])]
    return round(float(edges[peak] + 2.0), 1)
