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
from .measurements import SUMMARY_KEYS
from .regions import LOBE_CODES, LOBES
from .volume_io import write_volume

SUMMARY_COLUMNS = ("case", "anomaly_score", *SUMMARY_KEYS)


def worst_region_view(result: CaseResult) -> tuple[str, int, int]:
    """(region, axial index, coronal index) through the region with the highest index,
    at the slice and row holding most of its emphysema (its centre when it has none)."""
    candidates = [r for r in result.measurements.regions if not r.empty]
    rows = candidates or [result.measurements.whole]
    worst = max(rows, key=lambda r: r.emphysema_index_percent or 0.0)
    value = {v: k for k, v in result.legend.items()}.get(worst.region)
    mask = result.regions == value if value is not None else result.lungs > 0
    weight = mask & (result.emphysema > 0)
    if not weight.any():
        weight = mask
    z = int(np.argmax(weight.sum(axis=(1, 2))))
    y = int(np.argmax(weight.sum(axis=(0, 2))))
    return worst.region, z, y


def region_table_lines(result: CaseResult) -> list[str]:
    lines = [f"{'region':<20}{'vol mL':>8}{'EI %':>8}{'LAA950 %':>10}{'Perc15':>8}  stage"]
    for r in result.measurements:
        if r.empty:
            continue
        lines.append(f"{r.region:<20}{r.volume_ml:>8.0f}{r.emphysema_index_percent:>8.2f}"
                     f"{r.laa950_percent:>10.2f}{r.perc15_hu:>8.0f}  {r.stage}")
    return lines


def write_overlay(result: CaseResult, path: Path, case: str) -> Path:
    from .render import preview_rgb, save_png

    region, z, y = worst_region_view(result)
    image = preview_rgb(result.ct, labels=result.emphysema, axial_index=z, coronal_index=y,
                        outline=result.lungs)
    title = (f"{case}: emphysema (red) over the CT; worst region: {region}; "
             f"stage {result.measurements.whole.stage}")
    return save_png(image, path, text_lines=[title, ""] + region_table_lines(result))


def write_case(result: CaseResult, detector: Detector, case: str, output_dir: Path) -> Path:
    """All files of one case into output_dir/case, replacing an earlier run only once every
    file is complete."""
    final = Path(output_dir) / case
    final.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(final.parent, f".tmp-{case}-") as scratch:
        g = result.ct.geometry
        write_volume(result.anomaly.astype(np.float32), g, scratch / "anomaly_map.nii.gz")
        write_volume(result.emphysema.astype(np.uint8), g, scratch / "emphysema.nii.gz")
        write_volume(result.regions.astype(np.uint8), g, scratch / "regions.nii.gz")
        legend = {str(k): {"name": v, **({"code": LOBE_CODES[k]} if LOBES.get(k) == v else {})}
                  for k, v in sorted(result.legend.items())}
        (scratch / "regions.json").write_text(json.dumps(legend, indent=2))
        write_overlay(result, scratch / "overlay.png", case)
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
        "threshold": detector.threshold,
        "staging": detector.staging.to_dict(),
        "geometry": {"size_xyz": list(result.ct.shape[::-1]),
                     "spacing_mm": list(result.ct.geometry.spacing),
                     "origin_mm": list(result.ct.geometry.origin),
                     "direction": list(result.ct.geometry.direction)},
        "region_kind": result.region_kind,
        "anomaly_score": result.anomaly_score,
        "stage": result.measurements.whole.stage,
        "regions": result.measurements.to_dicts(),
        "timings_s": result.timings,
    }


def summary_row(case: str, result: CaseResult | None = None, error: str | None = None) -> dict:
    row = {"case": case}
    if result is not None:
        whole = result.measurements.whole.to_dict()
        row.update({"anomaly_score": result.anomaly_score, **{k: whole[k] for k in SUMMARY_KEYS}})
        for r in [*result.measurements.lungs, *result.measurements.regions]:
            row[f"stage {r.region}"] = r.stage
    row["error"] = error or ""
    return row


def write_summary(rows: list[dict], path: Path) -> Path:
    """The worklist: one row per case, highest anomaly score first, failures last."""
    ordered = sorted(rows, key=lambda r: (r["error"] != "", -(r.get("anomaly_score") or 0.0)))
    extra = sorted({k for r in rows for k in r} - set(SUMMARY_COLUMNS) - {"error"})
    columns = list(SUMMARY_COLUMNS) + extra + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, buffer.getvalue())
