"""Every figure the project writes, drawn with matplotlib (Agg, no display needed): the case
overlay of `detect`, the charts of `evaluate`, `benchmark` and `validate`, and the README's
screenshot. A fixed layout whatever the CT's size, units on every axis, a legend.

Helpers for any command's chart: `new_figure`, `lines` (series against x: ROC curves, Dice
by level), `strip_by_group` (a score's values by an ordinal group, e.g. by severity 0-5),
`bars` (named values), `save_figure` (a PNG written whole, then renamed). matplotlib is used
through its object interface only (Figure + the Agg canvas): no pyplot state, no global
backend switch, safe inside 3D Slicer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


DPI = 100
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2",
          "#7f7f7f", "#8c564b")
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9}


def new_figure(width_in: float = 7.0, height_in: float = 5.0, panels: int = 1):
    """(figure, list of axes side by side)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path) -> Path:
    """The figure as an RGB PNG at `path` (white background), written whole then renamed."""
    from .render import save_png

    fig.set_dpi(DPI)
    fig.set_facecolor("white")
    fig.canvas.draw()
    return save_png(np.asarray(fig.canvas.buffer_rgba())[..., :3], path)


def lines(ax, series, title: str, x_label: str, y_label: str, x_range=None, y_range=None,
          x_ticks=None, markers: bool = False, diagonal: bool = False, legend: bool = True):
    """Series [(name, xs, ys)] as lines (NaN points left out) on `ax`; x_ticks: [(value,
    label)] for categorical x; diagonal: the chance line of a ROC."""
    for k, (name, xs, ys) in enumerate(series):
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        ax.plot(xs[keep], ys[keep], color=COLORS[k % len(COLORS)], linewidth=1.8,
                marker="o" if markers else None, markersize=4, label=name)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    if x_range:
        ax.set_xlim(*x_range)
    if y_range:
        ax.set_ylim(*y_range)
    if x_ticks:
        ax.set_xticks([v for v, _ in x_ticks], [label for _, label in x_ticks])
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, color="0.88")
    if legend and series:
        ax.legend(loc="best", frameon=True)
    return ax


def strip_by_group(ax, groups, values, title: str, group_label: str, y_label: str,
                   seed: int = 0, show_median: bool = True, color=COLORS[1], label=None):
    """A strip chart: `values[i]` (a list of scores) plotted over ordinal group `groups[i]`
    (jittered horizontally), with each group's median as a bar and its count below."""
    rng = np.random.default_rng(seed)
    for i, (group, vals) in enumerate(zip(groups, values)):
        vals = np.asarray(vals, float)
        vals = vals[np.isfinite(vals)]
        ax.scatter(i + rng.uniform(-0.18, 0.18, vals.size), vals, s=18, color=color,
                   alpha=0.75, edgecolors="none", label=label if i == 0 else None)
        if show_median and vals.size:
            ax.hlines(np.median(vals), i - 0.3, i + 0.3, color="black", linewidth=2,
                      label="median" if i == 0 else None)
    ax.set_xticks(range(len(groups)),
                  [f"{g}\n(n={np.isfinite(np.asarray(v, float)).sum()})"
                   for g, v in zip(groups, values)])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_title(title)
    ax.set_xlabel(group_label)
    ax.set_ylabel(y_label)
    ax.grid(True, axis="y", color="0.88")
    ax.legend(loc="best")
    return ax


def bars(ax, names, values, title: str, value_label: str, fmt: str = "{:.2f}"):
    """Horizontal bars of named values, top to bottom in the given order, each labelled."""
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color=COLORS[1])
    ax.set_yticks(y, names)
    for yi, v in zip(y, values):
        ax.text(v, yi, " " + fmt.format(v), va="center", fontsize=9)
    ax.set_xlim(0, max(values, default=1) * 1.2 or 1)
    ax.set_title(title)
    ax.set_xlabel(value_label)
    ax.grid(True, axis="x", color="0.88")
    return ax


# --- images of a CT ----------------------------------------------------------------------
def image_panel(ax, rgb: np.ndarray, title: str, left: str = "R", right: str = "L",
                top: str = "A", scale_mm: float | None = None, pixel_mm: float = 1.0):
    """An RGB slice (square pixels of `pixel_mm`) with its orientation letters and a scale
    bar of `scale_mm` (default: 50 mm where it fits)."""
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    h, w = rgb.shape[:2]
    # a black outline keeps the labels readable where they fall on bright bone or tissue
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    style = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "path_effects": outline}
    ax.text(0.01, 0.5, left, transform=ax.transAxes, va="center", ha="left", **style)
    ax.text(0.99, 0.5, right, transform=ax.transAxes, va="center", ha="right", **style)
    ax.text(0.5, 0.99, top, transform=ax.transAxes, va="top", ha="center", **style)
    length = scale_mm or next((mm for mm in (100, 50, 20, 10) if mm / pixel_mm < 0.4 * w), None)
    if length:
        px = length / pixel_mm
        x0, y0 = w - px - 0.04 * w, h - 0.05 * h
        ax.plot([x0, x0 + px], [y0, y0], color="white", linewidth=3, path_effects=[
            patheffects.Stroke(linewidth=5, foreground="black"), patheffects.Normal()])
        ax.text(x0 + px / 2, y0 - 0.015 * h, f"{length:g} mm", color="white", ha="center",
                va="bottom", fontsize=9, path_effects=outline)
    return ax


def grey_colorbar(fig, ax, window: tuple[float, float], label: str = "CT (HU), lung window"):
    """A colour bar of the grey scale: the display window (width, level) in HU."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    width, level = window
    mappable = ScalarMappable(Normalize(level - width / 2, level + width / 2), cmap="gray")
    return fig.colorbar(mappable, ax=ax, label=label, fraction=0.04, pad=0.01)


def legend_patches(ax, items, loc="lower left", **kwargs):
    """A legend of [(label, colour, "fill" | "line")] entries on `ax` (an axes or a
    figure)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(c) / 255 if max(c) > 1 else c, label=label)
               if kind == "fill" else
               Line2D([], [], color=np.asarray(c) / 255 if max(c) > 1 else c, label=label,
                      linewidth=2) for label, c, kind in items]
    return ax.legend(handles=handles, loc=loc, **kwargs)


def table_panel(ax, header, rows, title: str | None = None, highlight=()):
    """A table of text cells filling `ax` (no axes); rows in `highlight` are shaded."""
    ax.axis("off")
    header_lines = max(str(h).count("\n") + 1 for h in header)
    height = min(1.0, (len(rows) + header_lines) / 11)  # rows of equal height whatever n
    table = ax.table(cellText=rows, colLabels=header, cellLoc="right", colLoc="right",
                     bbox=[0.0, 1.0 - height, 1.0, height])
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("0.8")
        if c == 0:
            cell.set_text_props(ha="left")
            cell._loc = "left"
        if r == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("0.92")
        elif r - 1 in highlight:
            cell.set_facecolor("#fff2cc")
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    return table


def case_overlay(axial: np.ndarray, right: np.ndarray, pixel_mm: float, title: str,
                 subtitle: str, header, rows, highlight=(), notes=(), legend_items=(),
                 window=(1500.0, -600.0), view_titles=("axial", "coronal"),
                 right_top: str = "S") -> Figure:
    """The case overlay: the axial view and a second view (coronal, or the plain axial
    slice for a volume of a few slices; `right_top` labels its top edge), the grey scale's
    colour bar, a legend, and the region table below; one fixed layout (1200 x 1000 px)
    whatever the CT's size."""
    fig = Figure(figsize=(12, 10), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    grid = fig.add_gridspec(2, 1, height_ratios=[2.1, 1.0])
    top = grid[0].subgridspec(1, 2)
    ax_axial = fig.add_subplot(top[0, 0])
    image_panel(ax_axial, axial, view_titles[0], pixel_mm=pixel_mm)
    ax_right = fig.add_subplot(top[0, 1])
    image_panel(ax_right, right, view_titles[1], top=right_top, pixel_mm=pixel_mm)
    grey_colorbar(fig, [ax_axial, ax_right], window)
    if legend_items:
        legend_patches(fig, legend_items, loc="outside lower center", ncols=len(legend_items))
    bottom = fig.add_subplot(grid[1])
    table_panel(bottom, header, rows, "\n".join([subtitle, *notes]), highlight)
    return fig
