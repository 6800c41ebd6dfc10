"""Outputs of detection: the files of one case and the batch's triage worklist."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .atomic import staging_dir, write_text_atomic
from .detection import CaseResult, Detector, report_dict
from .regions import LOBE_CODES, LOBES
from .volume_io import write_volume

SUMMARY_COLUMNS = ("case", "anomaly_score", "emphysema_index_percent", "laa950_percent",
                   "perc15_hu", "volume_ml", "stage")


def worst_region_view(result: CaseResult) -> tuple[str, int, int]:
    """(region, axial index, coronal index) through the region with the highest index,
    at the slice and row holding most of its emphysema (its centre when it has none)."""
    candidates = [r for r in result.measurements[3:] if r["emphysema_index_percent"] is not None]
    rows = candidates or result.measurements[:1]
    worst = max(rows, key=lambda r: r["emphysema_index_percent"] or 0.0)
    value = {v: k for k, v in result.legend.items()}.get(worst["region"])
    mask = result.regions == value if value is not None else result.lungs > 0
    weight = mask & (result.emphysema > 0)
    if not weight.any():
        weight = mask
    z = int(np.argmax(weight.sum(axis=(1, 2))))
    y = int(np.argmax(weight.sum(axis=(0, 2))))
    return worst["region"], z, y


def region_table_lines(result: CaseResult) -> list[str]:
    lines = [f"{'region':<20}{'vol mL':>8}{'EI %':>8}{'LAA950 %':>10}{'Perc15':>8}  stage"]
    for r in result.measurements:
        if r["emphysema_index_percent"] is None:
            continue
        lines.append(f"{r['region']:<20}{r['volume_ml']:>8.0f}"
                     f"{r['emphysema_index_percent']:>8.2f}{r['laa950_percent']:>10.2f}"
                     f"{r['perc15_hu']:>8.0f}  {r['stage']}")
    return lines


def write_overlay(result: CaseResult, path: Path, case: str) -> Path:
    from .render import preview_rgb, save_png

    region, z, y = worst_region_view(result)
    image = preview_rgb(result.ct, labels=result.emphysema, axial_index=z, coronal_index=y,
                        outline=result.lungs)
    title = (f"{case}: emphysema (red) over the CT; worst region: {region}; "
             f"stage {result.whole_lung['stage']}")
    return save_png(image, path, text_lines=[title, ""] + region_table_lines(result))


def write_case(result: CaseResult, detector: Detector, case: str, output_dir: Path) -> Path:
    """All files of one case into output_dir/case, replacing an earlier run only once every
    file is complete."""
    final = Path(output_dir) / case
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final.parent, f".tmp-{case}-")
    try:
        g = result.ct.geometry
        write_volume(result.anomaly.astype(np.float32), g, staging / "anomaly_map.nii.gz")
        write_volume(result.emphysema.astype(np.uint8), g, staging / "emphysema.nii.gz")
        write_volume(result.regions.astype(np.uint8), g, staging / "regions.nii.gz")
        legend = {str(k): {"name": v, **({"code": LOBE_CODES[k]} if LOBES.get(k) == v else {})}
                  for k, v in sorted(result.legend.items())}
        (staging / "regions.json").write_text(json.dumps(legend, indent=2))
        write_overlay(result, staging / "overlay.png", case)
        (staging / "report.json").write_text(
            json.dumps(report_dict(result, detector, case), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def summary_row(case: str, result: CaseResult | None = None, error: str | None = None) -> dict:
    row = {"case": case}
    if result is not None:
        whole = result.whole_lung
        row.update({"anomaly_score": result.anomaly_score,
                    **{k: whole[k] for k in SUMMARY_COLUMNS[2:]}})
        for r in result.measurements[1:]:
            row[f"stage {r['region']}"] = r["stage"]
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
