"""Outputs of detection: the files of one case (report.json among them) and the batch's
triage worklist (summary.csv)."""
from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import replace_folder, scratch_folder, write_text_atomic
from .detection import CaseResult, Detector
from .inference import precision
from .lungs import lung_legend, one_lung_note
from .measurements import COMPLETE, NOISE_WARN_HU, NOT_IN_SCAN, SUMMARY_KEYS, noisy
from .regions import LOBE_CODES, LOBES
from .render import display_axes
from .volume_io import write_volume

SUMMARY_COLUMNS = ("case", "anomaly_score", *SUMMARY_KEYS, "bullae_ml", "diffuse_ml")


def worst_region_view(result: CaseResult) -> tuple[str, int, int]:
    """(region, axial index, coronal index) through the region with the highest index,
    at the slice and row holding most of its emphysema (its centre when it has none); the
    indices run along the array axes nearest to superior and to posterior (render's
    display_axes), whatever plane the CT is stored in."""
    candidates = [r for r in result.measurements.regions if not r.empty]
    rows = candidates or [result.measurements.whole]
    worst = max(rows, key=lambda r: r.emphysema_index_percent or 0.0)
    value = {v: k for k, v in result.legend.items()}.get(worst.region)
    mask = result.regions == value if value is not None else result.lungs > 0
    weight = mask & (result.emphysema > 0)
    if not weight.any():
        weight = mask
    (s_axis, p_axis, _), _ = display_axes(result.ct.geometry.direction)
    z = int(np.argmax(weight.sum(axis=tuple(a for a in range(3) if a != s_axis))))
    y = int(np.argmax(weight.sum(axis=tuple(a for a in range(3) if a != p_axis))))
    return worst.region, z, y


TABLE_HEADER = ("Region", "Volume\n(mL)", "Emphysema\nindex (%)", "LAA-950\n(%)",
                "Perc15\n(HU)", "Stage", "Coverage")


def region_table(result: CaseResult) -> tuple[list[list[str]], list[int]]:
    """The overlay's table rows (every region, absent lobes too) and the rows to highlight
    (partial or not in scan)."""
    rows, highlight = [], []
    for r in result.measurements:
        if r.empty and r.coverage != NOT_IN_SCAN:
            continue
        if r.coverage != COMPLETE:
            highlight.append(len(rows))
        if r.empty:
            rows.append([r.region, "0", "-", "-", "-", "-", r.coverage])
        else:
            rows.append([r.region, f"{r.volume_ml:.0f}", f"{r.emphysema_index_percent:.2f}",
                         f"{r.laa950_percent:.2f}", f"{r.perc15_hu:.0f}", r.stage, r.coverage])
    return rows, highlight


def case_notes(result: CaseResult, detector: Detector | None = None) -> list[str]:
    """What a reader of the case should know besides its numbers (the overlay's note lines,
    report.json's "notes", the Slicer status line): ROI or partial scan, one lung only, a
    shifted HU scale, bullae, noise, a threshold set on other scans, lobes not scanned."""
    notes = []
    if result.region_kind == "roi":
        notes.append("An ROI of parenchyma, no whole lung: measured where it is at lung "
                     "density; its scale cannot be checked (no air outside the body).")
    elif result.measurements.whole.partial:
        notes.append("Partial scan: the lungs reach its first or last slice or the edge of its "
                     "field of view. Shaded regions are partial; their values describe the "
                     "scanned part only.")
    one_lung = None if result.region_kind == "roi" else one_lung_note(result.lungs)
    if one_lung:
        notes.append(one_lung)
    check = result.hu_check
    if check is not None and check.shifted:
        notes.append(f"HU scale shifted by {check.shift_hu:+.0f} HU ({check.describe()}): "
                     + ("taken off before everything here." if result.hu_corrected else
                        "not corrected; densities and the model's input are shifted too."))
    if result.bullae_ml:
        notes.append(f"Bullae (air spaces over 1 cm across, found by density): "
                     f"{result.bullae_ml:.1f} mL, counted as emphysema.")
    if round(result.diffuse_ml, 1):  # not a few voxels' worth
        notes.append(f"Diffuse loss (lung whose lobules are at emphysema density, found by "
                     f"density): {result.diffuse_ml:.1f} mL, counted as emphysema.")
    if noisy(result.noise_hu):
        notes.append(f"Noisy scan: the lungs' noise is about {result.noise_hu:.0f} HU (above "
                     f"{NOISE_WARN_HU:.0f}); noise can be flagged as emphysema.")
    site_noise = detector.off_site_noise(result.noise_hu) if detector else None
    if site_noise:
        notes.append(f"Threshold set on other scans: the lungs' noise, {result.noise_hu:.0f} HU, "
                     f"is far from that of the site's healthy scans ({site_noise}); another "
                     "kernel or dose?")
    if result.region_kind == "lobes" and any(r.coverage == NOT_IN_SCAN
                                             for r in result.measurements):
        notes.append("Lobes 'not in scan': in the lobe map but not in the scanned lungs.")
    return notes


def write_overlay(result: CaseResult, path: Path, case: str, detector: Detector | None = None
                  ) -> Path:
    from .plots import case_overlay, save_figure
    from .render import LABEL_COLORS, LUNG_WINDOW, OUTLINE_COLORS, preview_views

    region, z, y = worst_region_view(result)
    axial, right, pixel = preview_views(result.ct, labels=result.emphysema, axial_index=z,
                                        coronal_index=y, outline=result.lungs)
    s_axis = display_axes(result.ct.geometry.direction)[0][0]
    axial_title = (f"axial (slice {z + 1} of {result.ct.shape[s_axis]}, "
                   f"{result.ct.geometry.spacing_zyx[s_axis]:g} mm)")
    right_title, right_top = "coronal (patient right on the left)", "S"
    if right.shape[0] < 24:  # a few slices only: the coronal view would be a thin strip,
        # so the same axial slice without marks, to compare the flagged voxels with the CT
        right, _, _ = preview_views(result.ct, axial_index=z, coronal_index=y)
        right_title, right_top = "the same slice, CT only", "A"
    whole = result.measurements.whole
    rows, highlight = region_table(result)
    notes = case_notes(result, detector)
    roi = result.region_kind == "roi"
    threshold = (f", anomaly probability > {detector.threshold:g} at emphysema density, "
                 "grown over its lesion" if detector else "")
    kind = {"zones": "zones (thirds of each lung's height, not lobes)",
            "roi": "an ROI of parenchyma (its part at lung density; no sides)"}.get(
        result.region_kind, result.region_kind)
    if result.region_kind == "zones" and not result.legend:
        kind = "each lung (too few slices for zones)"
    title = (f"{case}: stage {whole.stage}"
             + (" (ROI)" if roi else " (partial scan)" if whole.partial else "")
             + f", emphysema index {whole.emphysema_index_percent:.2f} %")
    subtitle = f"Regions: {kind}. Views through the worst region: {region}."
    legend = [(f"emphysema{threshold}", LABEL_COLORS[1], "fill")] + [
        (f"{name} outline", OUTLINE_COLORS[value], "line")
        for value, name in lung_legend(result.lungs).items()]
    fig = case_overlay(axial, right, pixel, title, subtitle, TABLE_HEADER, rows, highlight,
                       notes, legend, LUNG_WINDOW, (axial_title, right_title), right_top)
    return save_figure(fig, path)


def write_case(result: CaseResult, detector: Detector, case: str, output_dir: Path) -> Path:
    """All files of one case into output_dir/case, replacing an earlier run only once every
    file is complete."""
    final = Path(output_dir) / case
    final.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(final.parent, f".tmp-{case}-") as scratch:
        g = result.ct.geometry
        write_volume(result.anomaly.astype(np.float32), g, scratch / "anomaly_map.nii.gz")
        write_volume(result.emphysema.astype(np.uint8), g, scratch / "emphysema.nii.gz")
        write_volume(result.lungs.astype(np.uint8), g, scratch / "lungs.nii.gz")
        write_volume(result.regions.astype(np.uint8), g, scratch / "regions.nii.gz")
        legend = {str(k): {"name": v, **({"code": LOBE_CODES[k]} if LOBES.get(k) == v else {})}
                  for k, v in sorted(result.legend.items())}
        (scratch / "regions.json").write_text(json.dumps(legend, indent=2))
        write_overlay(result, scratch / "overlay.png", case, detector)
        (scratch / "report.json").write_text(
            json.dumps(report_dict(result, detector, case), indent=2))
        replace_folder(scratch, final)
    return final


def report_dict(result: CaseResult, detector: Detector, case: str) -> dict:
    """What report.json holds (its keys are read by users outside the project: keep them)."""
    return {
        "case": case,
        "input": result.ct.source,
        "software": {"name": "EmphysemaUAD", "version": __version__,
                     "python": platform.python_version(), "torch": torch.__version__},
        "model": {"path": detector.model_path, "config": detector.config},
        "device": str(detector.device),
        "precision": precision(detector.device),
        "threshold": detector.threshold,
        "staging": detector.staging.to_dict(),
        "geometry": {"size_xyz": list(result.ct.shape[::-1]),
                     "spacing_mm": list(result.ct.geometry.spacing),
                     "origin_mm": list(result.ct.geometry.origin),
                     "direction": list(result.ct.geometry.direction)},
        "lung_noise_hu": result.noise_hu,
        # the measured HU scale (calibration.py) and whether its shift was taken off
        "hu_calibration": None if result.hu_check is None else {
            **result.hu_check.as_dict(), "corrected": result.hu_corrected},
        "lung_labels": {str(k): v for k, v in lung_legend(result.lungs).items()},  # lungs.nii.gz
        "bullae_ml": result.bullae_ml,
        "diffuse_ml": result.diffuse_ml,
        "region_kind": result.region_kind,
        "anomaly_score": result.anomaly_score,
        "stage": result.measurements.whole.stage,
        "regions": result.measurements.to_dicts(),
        "notes": case_notes(result, detector),
        "timings_s": result.timings,
    }


def stage_text(row) -> str:
    """A region's stage as the worklist and the overlay show it, with its coverage."""
    if row.coverage == NOT_IN_SCAN:
        return NOT_IN_SCAN
    if row.stage is None:
        return ""
    return f"{row.stage} (partial)" if row.partial else row.stage


def summary_row(case: str, result: CaseResult | None = None, error: str | None = None) -> dict:
    row = {"case": case}
    if result is not None:
        whole = result.measurements.whole.to_dict()
        row.update({"anomaly_score": result.anomaly_score, **{k: whole[k] for k in SUMMARY_KEYS},
                    "bullae_ml": result.bullae_ml, "diffuse_ml": result.diffuse_ml,
                    "coverage": whole["coverage"]})
        for r in [*result.measurements.lungs, *result.measurements.regions]:
            row[f"stage {r.region}"] = stage_text(r)
    row["error"] = error or ""
    return row


def _region_rank(name: str) -> tuple:
    """Anatomical order of a region: right lung, left lung, then right before left and each
    side from upper to lower (lobes, then zones); other regions after, by name."""
    if name in ("right lung", "left lung"):
        return (0, name != "right lung")
    words = set(name.split())
    side = 0 if "right" in words else 1 if "left" in words else 2
    level = next((i for i, w in enumerate(("upper", "middle", "lower")) if w in words), 3)
    return (1 if side < 2 and level < 3 else 2, side, "zone" in words, level, name)


def write_summary(rows: list[dict], path: Path) -> Path:
    """The worklist: one row per case, highest anomaly score first, failures last."""
    ordered = sorted(rows, key=lambda r: (r["error"] != "", -(r.get("anomaly_score") or 0.0)))
    extra = sorted({k for r in rows for k in r} - set(SUMMARY_COLUMNS) - {"error"},
                   key=lambda k: (k != "coverage", _region_rank(k.removeprefix("stage "))))
    columns = list(SUMMARY_COLUMNS) + extra + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, buffer.getvalue())
