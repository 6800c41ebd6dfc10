"""Line charts drawn with numpy into RGB arrays (no plotting library is a dependency).

Light grey axes, grid and captions (render.text_block's font) on black, one colour per series,
and a legend below the plot; write them with render.save_png.
"""
from __future__ import annotations

import numpy as np

from .render import GLYPH_H, GLYPH_W, TEXT_MARGIN, text_block

COLORS = ((255, 90, 80), (90, 170, 255), (120, 220, 100), (255, 200, 40), (220, 110, 255),
          (0, 220, 220), (255, 120, 190), (200, 200, 200), (160, 120, 80))
GRID, AXIS = (55, 55, 55), (170, 170, 170)
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 24, 40  # margins around the plot area, pixels


def _text(canvas: np.ndarray, text: str, x: int, y: int, center: bool = False) -> None:
    """Paste one line of text with its top-left corner (or top centre) at (x, y), clipped."""
    width = len(text) * GLYPH_W + 2 * TEXT_MARGIN
    block = text_block([text], width)
    if center:
        x -= width // 2
    h, w = canvas.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + block.shape[1], w), min(y + block.shape[0], h)
    if x1 > x0 and y1 > y0:
        part = block[y0 - y:y1 - y, x0 - x:x1 - x]
        lit = part.any(axis=2)
        canvas[y0:y1, x0:x1][lit] = part[lit]


def _polyline(canvas, rows, cols, color, thickness: int = 2) -> None:
    h, w = canvas.shape[:2]
    for r0, c0, r1, c1 in zip(rows[:-1], cols[:-1], rows[1:], cols[1:]):
        n = int(max(abs(r1 - r0), abs(c1 - c0))) + 1
        rr = np.rint(np.linspace(r0, r1, n)).astype(int)
        cc = np.rint(np.linspace(c0, c1, n)).astype(int)
        for dr in range(thickness):
            for dc in range(thickness):
                ok = (rr + dr >= 0) & (rr + dr < h) & (cc + dc >= 0) & (cc + dc < w)
                canvas[rr[ok] + dr, cc[ok] + dc] = color


def line_chart(series, title: str, x_label: str, y_label: str, x_range=(0.0, 1.0),
               y_range=(0.0, 1.0), x_ticks=None, markers: bool = False,
               size=(300, 420)) -> np.ndarray:
    """(H, W, 3) uint8 chart of `series`: [(name, xs, ys)] or [(name, xs, ys, style)] with
    style "line", "points" or "line+points" (default: "line+points" with `markers`, else
    "line"); NaN points left out; x_ticks: [(value, label)] (default: five even ticks of
    x_range)."""
    height, width = size
    legend_rows = len(series)
    canvas = np.zeros((height + legend_rows * (GLYPH_H + 3) + 6, width, 3), np.uint8)
    x0, x1, y0, y1 = LEFT, width - RIGHT, TOP, height - BOTTOM
    (xa, xb), (ya, yb) = x_range, y_range

    def col(x):
        return x0 + (np.asarray(x, float) - xa) / (xb - xa) * (x1 - x0)

    def row(y):
        return y1 - (np.asarray(y, float) - ya) / (yb - ya) * (y1 - y0)

    if x_ticks is None:
        x_ticks = [(v, f"{v:g}") for v in np.linspace(xa, xb, 5)]
    for value, label in x_ticks:
        c = int(round(float(col(value))))
        canvas[y0:y1 + 1, c] = GRID
        _text(canvas, label, c, y1 + 4, center=True)
    for value in np.linspace(ya, yb, 5):
        r = int(round(float(row(value))))
        canvas[r, x0:x1 + 1] = GRID
        _text(canvas, f"{value:g}", 2, r - GLYPH_H // 2)
    canvas[y0:y1 + 1, x0] = AXIS
    canvas[y1, x0:x1 + 1] = AXIS
    _text(canvas, title, width // 2, 4, center=True)
    _text(canvas, x_label, (x0 + x1) // 2, y1 + 4 + GLYPH_H + 2, center=True)
    _text(canvas, y_label, x0 + 2, y0 - 2)
    for k, (name, xs, ys, *style) in enumerate(series):
        style = style[0] if style else ("line+points" if markers else "line")
        color = COLORS[k % len(COLORS)]
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        rows, cols = row(ys[keep]), col(xs[keep])
        if "line" in style:
            _polyline(canvas, rows, cols, color)
        if "points" in style:
            for r, c in zip(np.rint(rows).astype(int), np.rint(cols).astype(int)):
                canvas[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4] = color
        legend_y = height + 4 + k * (GLYPH_H + 3)
        canvas[legend_y + 1:legend_y + GLYPH_H - 1, x0:x0 + 14] = color
        _text(canvas, name, x0 + 18, legend_y - 1)
    return canvas


def nice_range(values, ticks: int = 4) -> tuple[float, float]:
    """A y range holding the finite values whose `ticks` even steps are round numbers (1, 2,
    2.5 or 5 times a power of ten), so that line_chart's five grid labels read well."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    exponent = np.floor(np.log10((high - low) / ticks))
    for factor in (1, 2, 2.5, 5, 10, 20):
        step = factor * 10.0 ** exponent
        start = np.floor(low / step) * step
        if start + ticks * step >= high - 1e-12:
            return float(round(start, 12)), float(round(start + ticks * step, 12))
    return low, high


def side_by_side(images, gap: int = 8) -> np.ndarray:
    """Charts next to each other, top-aligned, on black."""
    height = max(im.shape[0] for im in images)
    out = np.zeros((height, sum(im.shape[1] for im in images) + gap * (len(images) - 1), 3),
                   np.uint8)
    x = 0
    for im in images:
        out[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out
