"""Parenchyma regions of interest (ROIs): small images cut from a chest CT around lung tissue.

Labelled emphysema collections often come as such ROIs: a few centimetres of parenchyma, at
most with a piece of chest wall, mediastinum or a large vessel at one side. They hold no air
outside the body and no whole lung, so the lung segmentation (lungs.py) finds nothing in
them. An image no larger than ROI_MAX_EXTENT_MM along any axis, in which the segmentation
finds no lung, is measured as an ROI instead: its lung is the part at lung density (below
PARENCHYMA_HU after smoothing over SMOOTH_MM; vessels enclosed by it included), of unknown
side (label ROI); a part that is mostly air (median below AIR_HU: -1000 HU and its noise) is
no lung. The network sees the whole image, mirrored at its edges (inference.py): framed by
air, as the lungs' box of a whole CT is, the 90 labelled HRCT patches of ../shared/data
ranked worse (AUROC normal vs emphysema over their lung part 0.93, mirrored 1.00).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .lungs import ROI, segment_lungs
from .regions import in_plane_cross, in_plane_sigma, superior_axis
from .volume_io import MIN_LUNG_SHARE, PARENCHYMA_HU, Volume, roi_sized

SMOOTH_MM = 1.0  # noise and the finest septa do not split the lung part
MIN_PIXELS = 16  # in-plane pixels along each side: the network's four 2x down-steps
AIR_HU = -985.0  # a lung part whose median lies below this is air, not parenchyma
MAX_VESSEL_MM2 = 80.0  # enclosed holes up to this cross-section (10 mm across) are vessels


def is_roi(lungs: np.ndarray) -> bool:
    """Whether a lung label map is an ROI's (find_lungs)."""
    return bool((lungs == ROI).any())


def find_lungs(ct: Volume) -> np.ndarray:
    """Lung labels of a CT (right 1, left 2; lungs.py), or of an ROI (ROI, see the module
    docstring); all zero where neither is found."""
    lungs = segment_lungs(ct)
    if lungs.any() or not roi_sized(ct.shape, ct.geometry.spacing_zyx):
        return lungs
    return roi_lungs(ct)


def roi_lungs(ct: Volume) -> np.ndarray:
    """The lung-density part of an ROI image as ROI labels; all zero when less than
    MIN_LUNG_SHARE of the image is lung. InputError when its slices are too small for the
    network."""
    spacing = np.asarray(ct.geometry.spacing_zyx, dtype=float)
    axis = superior_axis(ct.geometry)[0]
    in_plane = [a for a in range(3) if a != axis]
    lung = ndi.gaussian_filter(ct.array.astype(np.float32),
                               in_plane_sigma(ct.geometry, SMOOTH_MM)) < PARENCHYMA_HU
    lung &= ct.array > -1500  # not the scan field's padding
    # air alone (outside a body, a field of view of nothing) is not a lung to measure
    if lung.mean() < MIN_LUNG_SHARE or np.median(ct.array[lung]) < AIR_HU:
        return np.zeros(ct.shape, np.uint8)
    # vessels enclosed by lung within a slice (a volume one slice thick has no enclosed 3-D
    # holes) belong to it; larger enclosed tissue does not
    structure = in_plane_cross(ct.geometry)
    holes, count = ndi.label(ndi.binary_fill_holes(lung, structure) & ~lung, structure)
    if count:
        pixel_mm2 = float(np.prod(spacing[in_plane]))
        sizes = ndi.sum_labels(np.ones(lung.shape), holes, np.arange(1, count + 1)) * pixel_mm2
        lung |= np.isin(holes, 1 + np.flatnonzero(sizes <= MAX_VESSEL_MM2))
    if min(ct.shape[a] for a in in_plane) < MIN_PIXELS:
        size = " x ".join(str(ct.shape[a]) for a in in_plane)
        raise InputError(f"{ct.source or 'ROI'}: an ROI of {size} pixels is too small; the "
                         f"network needs at least {MIN_PIXELS} pixels along each side of a "
                         "slice.")
    return np.where(lung, ROI, 0).astype(np.uint8)
