"""PNG previews of a CT: an axial and a coronal slice side by side, with optional overlays.

Shown in the radiological convention whatever the volume's direction: patient right on the
image left, anterior up on the axial view, superior up on the coronal view. Both views are
resampled to square pixels so that anatomy keeps its physical proportions. Plain images
are written with SimpleITK, atomically; figures with text (the case overlay) are drawn in
plots.py with matplotlib.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_path
from .errors import InputError
from .volume_io import Volume

LUNG_WINDOW = (1500.0, -600.0)  # width, level in HU
LABEL_COLORS = {1: (255, 40, 40), 2: (255, 210, 0), 3: (60, 140, 255), 4: (60, 220, 90),
                5: (220, 80, 255), 6: (0, 220, 220)}
OUTLINE_COLORS = {1: (0, 220, 220), 2: (60, 220, 90), 3: (60, 140, 255), 4: (255, 150, 0),
                  5: (220, 80, 255), 6: (255, 255, 255)}
LABEL_ALPHA = 0.45
GAP_PX = 4


def window(hu: np.ndarray, width: float = LUNG_WINDOW[0], level: float = LUNG_WINDOW[1]):
    """HU -> uint8 grey levels of a display window."""
    grey = (np.asarray(hu, np.float32) - (level - width / 2)) / width
    return np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)


def display_axes(direction) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For the array axes (z, y, x): which array axis runs along each patient axis (S, A->P,
    R->L in display order) and whether it must be flipped. LPS: +x left, +y posterior,
    +z superior. Oblique directions use the closest patient axis."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # column i: direction of ITK index i
    columns = np.abs(d)
    order, flips = [None, None, None], [False, False, False]
    # physical row 2 (S), row 1 (P), row 0 (L) -> display axes 0 (vertical on coronal),
    # 1 (vertical on axial), 2 (horizontal on both)
    for display, physical in ((0, 2), (1, 1), (2, 0)):
        itk_index = int(np.argmax(columns[physical]))
        columns[:, itk_index] = -1.0  # each array axis used once
        order[display] = 2 - itk_index  # ITK index i is numpy axis 2 - i
        # display 0 shows superior at the top of the coronal view: array index runs I->S,
        # so the rows are flipped later; displays 1 and 2 want index increasing to P and L
        flips[display] = d[physical, itk_index] < 0
    return tuple(order), tuple(flips)


def canonical(array: np.ndarray, direction) -> tuple[np.ndarray, tuple[int, int, int],
                                                     tuple[bool, bool, bool]]:
    """The array as (inferior->superior, anterior->posterior, right->left) plus the axis
    order and flips used (to map indices of the original array)."""
    order, flips = display_axes(direction)
    out = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out, order, flips


def _resample(image: np.ndarray, spacing: tuple[float, float], pixel: float, order: int):
    """A 2-D image resampled to square pixels of `pixel` mm (order 0 for labels)."""
    shape = [max(1, int(round(n * s / pixel))) for n, s in zip(image.shape, spacing)]
    if tuple(shape) == image.shape:
        return image
    coords = np.meshgrid(*[np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
                           for m, n in zip(shape, image.shape)], indexing="ij")
    return ndimage.map_coordinates(image, coords, order=order, mode="nearest")


def _views(array, spacing_zyx, axial, coronal, pixel, order):
    """Axial and coronal display images of a canonical array at square pixels."""
    sz, sy, sx = spacing_zyx
    ax = _resample(array[axial], (sy, sx), pixel, order)
    co = _resample(array[:, coronal, :][::-1], (sz, sx), pixel, order)
    return ax, co


def _overlay(rgb: np.ndarray, labels: np.ndarray, colors: dict, alpha: float) -> None:
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            rgb[mask] = (rgb[mask] * (1 - alpha) + np.asarray(color) * alpha).astype(np.uint8)


def _outline(rgb: np.ndarray, labels: np.ndarray, colors: dict) -> None:
    for value, color in colors.items():
        mask = labels == value
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        rgb[edge] = color


def _canonical_index(index, axis_len, flipped, default):
    if index is None:
        return default
    if not 0 <= index < axis_len:
        raise InputError(f"slice index {index} is outside the volume (0..{axis_len - 1}).")
    return axis_len - 1 - index if flipped else index


def preview_views(ct: Volume, labels=None, label_colors=None, axial_index=None,
                  coronal_index=None, outline=None, outline_colors=None,
                  alpha: float = LABEL_ALPHA) -> tuple[np.ndarray, np.ndarray, float]:
    """(axial RGB, coronal RGB, pixel size in mm): lung window, overlays, square pixels.

    labels: integer map on the CT grid shown as semi-transparent colours (label_colors:
    {value: (r, g, b)}, default LABEL_COLORS); outline: integer map whose regions are drawn
    as outlines (e.g. the lungs). axial_index / coronal_index: indices along the array axes
    nearest to superior-inferior and anterior-posterior (z and y for axial series); default
    the middle of the labels when given, else of the volume."""
    array, order, flips = canonical(ct.array, ct.geometry.direction)
    spacing = tuple(ct.geometry.spacing_zyx[a] for a in order)
    extra = [m for m in (labels, outline) if m is not None]
    for m in extra:
        if np.shape(m) != ct.array.shape:
            raise InputError(f"overlay of shape {np.shape(m)} does not match the CT "
                             f"{ct.array.shape}.")
    canon = [canonical(np.asarray(m), ct.geometry.direction)[0] for m in extra]
    focus = canon[0] > 0 if canon and np.any(canon[0]) else None
    defaults = [n // 2 for n in array.shape]
    if focus is not None:  # the slice with the most labelled voxels
        defaults[0] = int(np.argmax(focus.sum(axis=(1, 2))))
        defaults[1] = int(np.argmax(focus.sum(axis=(0, 2))))
    # the user's indices are along the original axes that map to S and P
    z = _canonical_index(axial_index, array.shape[0], flips[0], defaults[0])
    y = _canonical_index(coronal_index, array.shape[1], flips[1], defaults[1])
    pixel = min(spacing[1], spacing[2])
    grey = _views(array, spacing, z, y, pixel, 1)
    images = []
    for view, g in enumerate(grey):
        rgb = np.repeat(window(g)[..., None], 3, axis=2)
        if labels is not None:
            _overlay(rgb, _views(canon[0], spacing, z, y, pixel, 0)[view],
                     label_colors or LABEL_COLORS, alpha)
        if outline is not None:
            _outline(rgb, _views(canon[-1], spacing, z, y, pixel, 0)[view],
                     outline_colors or OUTLINE_COLORS)
        images.append(rgb)
    return images[0], images[1], pixel


def preview_rgb(ct: Volume, labels=None, label_colors=None, axial_index=None,
                coronal_index=None, outline=None, outline_colors=None,
                alpha: float = LABEL_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: axial slice | coronal slice (see preview_views), side by side."""
    *images, _ = preview_views(ct, labels, label_colors, axial_index, coronal_index, outline,
                               outline_colors, alpha)
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + GAP_PX
    out = np.zeros((height, width, 3), np.uint8)
    out[:images[0].shape[0], :images[0].shape[1]] = images[0]
    out[:images[1].shape[0], images[0].shape[1] + GAP_PX:] = images[1]
    return out


def save_png(image: np.ndarray, path) -> Path:
    """Write an (H, W, 3) uint8 image as PNG atomically (figures with text: plots.py)."""
    image = np.asarray(image, np.uint8)
    with atomic_path(path) as temp:
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(temp))
    return Path(path)


def render_preview(ct: Volume, path, labels=None, label_colors=None, axial_index=None,
                   coronal_index=None, outline=None) -> Path:
    """Axial + coronal preview PNG of a CT (see preview_rgb); returns the path written."""
    image = preview_rgb(ct, labels, label_colors, axial_index, coronal_index, outline)
    return save_png(image, path)
