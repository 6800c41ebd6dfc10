"""Validation on a labelled cohort of one's own: `emphysema-uad validate LABELS.csv`.

The CSV names the images and their labels (one row per image):
- `file`: the image (volume file or DICOM series folder), relative to the CSV or absolute;
- `subject`: who the image belongs to; the 95 % intervals resample subjects, not images,
  because the images of one subject are not independent;
- at least one of `pattern` (`normal`, or an emphysema subtype: any other word, e.g.
  centrilobular, paraseptal, panlobular, bullous; compared in lower case; PATTERN_ALIASES
  are read as the names they stand for, e.g. NT as normal, CLE as centrilobular), `severity`
  (an integer 0-5, 0 = no emphysema) and `stage` (None, Mild, Moderate, Severe);
- any other columns (e.g. `level`), which are carried into cases.csv.
Rows are numbered as in a spreadsheet: the header is row 1.

Each image is scored by the model (or read from an earlier `detect` results folder) and by
density baselines in the same lung mask. Every score is oriented so that higher means more
emphysema (Perc15 is ranked as -Perc15). The reference stage of an image is its `stage`
column, else its severity mapped by SEVERITY_STAGES.

Metrics, for every score side by side: AUROC normal vs emphysema, AUROC normal vs each
pattern, Spearman with severity; for the model's stage: the confusion matrix against the
reference stage, the share of images with severity >= 2 (or a reference stage above None)
staged above None, the share of normal images staged None, and the stage agreement. 95 %
intervals by a percentile bootstrap over subjects (metrics.cluster_bootstrap); a resample
where a metric is undefined (a class missing) is left out of that metric's interval and the
number used is reported.

With site folds (`--site-folds K`, SiteFolds), every image is scored at the threshold
`site-threshold` sets from the normal images of the other folds' subjects, not at the
model's: how the model would do at a site that set its threshold from its own healthy scans,
without any subject setting its own.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import __version__, metrics
from .errors import InputError
from .measurements import NOISE_WARN_HU, PARTIAL, laa_percent, noisy, perc15_hu
from .progress import NO_PROGRESS, Progress
from .staging import STAGES

SEVERITY_STAGES = {0: "None", 1: "Mild", 2: "Mild", 3: "Moderate", 4: "Moderate", 5: "Severe"}
LABEL_COLUMNS = ("pattern", "severity", "stage")
NORMAL = "normal"
# the abbreviations of the literature (e.g. the LBP emphysema database: NT, CLE, PSE) and
# other words for normal, read as the names the reports use
PATTERN_ALIASES = {"nt": NORMAL, "healthy": NORMAL, "none": NORMAL, "no emphysema": NORMAL,
                   "cle": "centrilobular", "pse": "paraseptal", "ple": "panlobular"}
SENSITIVITY_SEVERITY = 2  # "staged above None" is counted over images of at least this severity
LAA_THRESHOLDS_HU = (-950.0, -910.0)
DEFAULT_BOOTSTRAP = 2000
REPORT_FORMAT = "emphysema-uad-validation"


class Score(NamedTuple):
    """A case score: `get` takes a case's measurements (the whole-lung row of `detect`, its
    anomaly_score, and the density measures of `density_measures`) and returns a number that
    is higher for more emphysema."""

    key: str
    label: str
    get: Callable[[dict], float]
    unit: str = ""


# A new whole-lung model measurement is compared with the others by adding one line here.
SCORES = [
    Score("anomaly_score", "model anomaly score", lambda m: m["anomaly_score"], "%"),
    Score("model_ei", "model EI", lambda m: m["emphysema_index_percent"], "%"),
    Score("laa950", "LAA-950", lambda m: m["laa950_percent"], "%"),
    Score("laa910", "LAA-910", lambda m: m["laa910_percent"], "%"),
    Score("perc15", "Perc15", lambda m: -m["perc15_hu"], "HU"),
]
SCORE_NOTES = {"perc15": "ranked as -Perc15 (a lower 15th percentile of HU is more emphysema)"}


# --- labels --------------------------------------------------------------------------------
@dataclass
class LabelledCase:
    row: int  # spreadsheet row number in the CSV (header = row 1)
    file: Path
    subject: str
    pattern: str | None
    severity: int | None
    stage: str | None  # the reference stage: the stage column, else from the severity
    extra: dict = field(default_factory=dict)  # the CSV's other columns
    name: str = ""  # the case folder name `detect` gives this file

    @property
    def emphysema(self) -> bool:
        """The truth of "normal vs emphysema": the pattern, else severity > 0, else stage."""
        if self.pattern is not None:
            return self.pattern != NORMAL
        if self.severity is not None:
            return self.severity > 0
        return self.stage != "None"


@dataclass
class Labels:
    path: Path
    cases: list[LabelledCase]
    columns: tuple[str, ...]  # the label columns present, in LABEL_COLUMNS order
    extra_columns: list[str]

    @property
    def stage_source(self) -> str | None:
        if "stage" in self.columns:
            return "the stage column"
        if "severity" in self.columns:
            return "severity 0 -> None, 1-2 -> Mild, 3-4 -> Moderate, 5 -> Severe"
        return None

    @property
    def subjects(self) -> list[str]:
        return sorted({c.subject for c in self.cases})

    @property
    def patterns(self) -> list[str]:
        """The emphysema subtypes present, in order of first appearance."""
        return list(dict.fromkeys(c.pattern for c in self.cases
                                  if c.pattern not in (None, NORMAL)))


def _pattern(text: str) -> str:
    word = text.lower()
    return PATTERN_ALIASES.get(word, word)


def _severity(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value.is_integer() and 0 <= value <= 5):
        raise InputError(f"{where}: severity {text!r} is not a whole number from 0 to 5.")
    return int(value)


def _stage(text: str, where: str) -> str:
    for stage in STAGES:
        if text.lower() == stage.lower():
            return stage
    raise InputError(f"{where}: stage {text!r} is not one of {', '.join(STAGES)}.")


def read_labels(path) -> Labels:
    """Read and check the labels CSV; InputError naming the row for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text CSV file (it is not UTF-8).") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    numbered = []  # (row number, fields) of the non-blank rows
    try:
        for record in reader:
            if any(v.strip() for v in record):
                numbered.append((reader.line_num, record))
    except csv.Error as exc:
        raise InputError(f"{path} row {reader.line_num}: not valid CSV ({exc}).") from None
    if not numbered:
        raise InputError(f"{path}: the labels file is empty.")
    header_row, header = numbered[0]
    columns = [name.strip().lower() for name in header]
    duplicated = sorted({c for c in columns if columns.count(c) > 1 and c})
    if duplicated:
        raise InputError(f"{path} row {header_row}: column {duplicated[0]!r} appears twice.")
    missing = [c for c in ("file", "subject") if c not in columns]
    labels = tuple(c for c in LABEL_COLUMNS if c in columns)
    if missing or not labels:
        need = " and ".join(repr(c) for c in missing) if missing else \
            "at least one of 'pattern', 'severity', 'stage'"
        raise InputError(f"{path} row {header_row}: the header lacks {need} (columns found: "
                         f"{', '.join(repr(c) for c in columns)}; a comma-separated file is "
                         "expected).")
    extra = [c for c in columns if c and c not in ("file", "subject") + LABEL_COLUMNS]
    cases, seen = [], {}
    for row, record in numbered[1:]:
        where = f"{path} row {row}"
        if len(record) != len(columns):
            raise InputError(f"{where}: {len(record)} fields where the header has "
                             f"{len(columns)}.")
        values = {c: v.strip() for c, v in zip(columns, record) if c}
        for column in ("file", "subject") + labels:
            if not values[column]:
                raise InputError(f"{where}: the {column} is empty.")
        file = path.parent / values["file"]
        if not file.exists():
            raise InputError(f"{where}: image {values['file']} not found (looked for {file}).")
        key = file.resolve()
        if key in seen:
            raise InputError(f"{where}: image {values['file']} is already listed in row "
                             f"{seen[key]}.")
        seen[key] = row
        pattern = _pattern(values["pattern"]) if "pattern" in labels else None
        severity = _severity(values["severity"], where) if "severity" in labels else None
        stage = _stage(values["stage"], where) if "stage" in labels else None
        if pattern == NORMAL and severity:
            raise InputError(f"{where}: pattern normal with severity {severity}; a normal "
                             "image has severity 0.")
        if pattern not in (None, NORMAL) and severity == 0:
            raise InputError(f"{where}: pattern {pattern} with severity 0; severity 0 means "
                             "no emphysema (pattern normal).")
        if stage not in (None, "None") and (pattern == NORMAL or severity == 0):
            raise InputError(f"{where}: stage {stage} for an image without emphysema "
                             f"({'pattern normal' if pattern == NORMAL else 'severity 0'}).")
        if stage is None and severity is not None:
            stage = SEVERITY_STAGES[severity]
        cases.append(LabelledCase(row, file, values["subject"], pattern, severity, stage,
                                  {c: values[c] for c in extra}))
    if not cases:
        raise InputError(f"{path}: the labels file has a header but no rows.")
    _name_cases(cases, path)
    return Labels(path, cases, labels, extra)


def _name_cases(cases: list[LabelledCase], path: Path) -> None:
    """The case folder names `detect` gives these files when run on them in this order."""
    from .batch import collect_cases

    for case in cases:
        found = collect_cases([str(case.file)])
        if len(found) != 1 or found[0][2]:
            problem = found[0][2] if len(found) == 1 and found[0][2] else \
                f"the folder holds {len(found)} cases, not one image"
            raise InputError(f"{path} row {case.row}: {problem}")
        case.name = found[0][0]
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.name] = counts.get(case.name, 0) + 1
        if counts[case.name] > 1:
            case.name = f"{case.name}_{counts[case.name]}"


# --- scoring ---------------------------------------------------------------------------------
def density_measures(hu: np.ndarray, lungs: np.ndarray) -> dict:
    """LAA-950 and LAA-910 (% of lung voxels at or below the threshold) and Perc15 (HU)."""
    values = hu[lungs]
    if values.size == 0:
        raise InputError("no lung found; is this a chest CT?")
    out = {f"laa{-int(t)}_percent": laa_percent(values, t) for t in LAA_THRESHOLDS_HU}
    out["perc15_hu"] = perc15_hu(values)
    return out


def _plain(row: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def _detected(case: LabelledCase, detector, progress) -> dict:
    from .detection import detect_case
    from .volume_io import read_ct

    ct = read_ct(case.file, progress)
    result = detect_case(ct, detector, progress=progress, warn=False)
    whole = _plain(result.measurements.whole.to_dict())
    shift = result.hu_check.shift_hu if result.hu_check else None
    return {**whole, "anomaly_score": result.anomaly_score, "lung_noise_hu": result.noise_hu,
            "hu_shift_hu": shift, "hu_corrected": result.hu_corrected,
            "threshold": detector.threshold,
            **density_measures(result.ct.array, result.lungs > 0)}


def _from_results(case: LabelledCase, folder: Path, progress) -> tuple[dict, dict]:
    """(measurements, report.json) of a case from a `detect` results folder; the density
    measures come from the CT and the lung mask `detect` used."""
    from .calibration import HuCheck, corrected
    from .roi import find_lungs
    from .volume_io import read_ct, read_labels as read_label_map

    report_path = folder / case.name / "report.json"
    if not report_path.is_file():
        raise InputError(f"no detect results for this image: {report_path} not found.")
    try:
        report = json.loads(report_path.read_text())
        whole = report["regions"][0]
        if whole["region"] != "whole lung":
            raise KeyError("whole lung")
        anomaly_score = float(report["anomaly_score"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{report_path}: not a report.json of `emphysema-uad detect` "
                         f"({exc}).") from None
    ct = read_ct(case.file, progress)
    size = report.get("geometry", {}).get("size_xyz")
    if size is not None and list(size) != list(ct.shape[::-1]):
        raise InputError(f"{report_path} is of an image of size {size}, but {case.file} has "
                         f"{list(ct.shape[::-1])}; the results belong to another image.")
    hu = report.get("hu_calibration") or {}
    shift, was_corrected = hu.get("shift_hu"), bool(hu.get("corrected"))
    if was_corrected:  # the HU scale `detect` segmented and measured on
        ct = corrected(ct, HuCheck(hu.get("air_hu"), hu.get("fat_hu"), shift))
    lungs_path = folder / case.name / "lungs.nii.gz"
    if lungs_path.is_file():  # the lungs `detect` measured
        lungs = read_label_map(lungs_path, "lungs").array > 0
    else:  # results of a version that did not write them
        lungs = find_lungs(ct) > 0
    return {**whole, "anomaly_score": anomaly_score,
            "lung_noise_hu": report.get("lung_noise_hu"), "hu_shift_hu": shift,
            "hu_corrected": was_corrected, "threshold": report.get("threshold"),
            **density_measures(ct.array, lungs)}, report


def score_cases(labels: Labels, detector=None, results=None, progress: Progress = NO_PROGRESS,
                folds: "SiteFolds | None" = None) -> tuple[list[dict], dict]:
    """Measurements of every case (in CSV order) and a description of the model: run
    `detector` on each image (at the threshold of its subject's fold, with `folds`), or read
    the `detect` results folder `results`."""
    measured, model = [], None
    total = len(labels.cases)
    for number, case in enumerate(labels.cases, 1):
        progress.event("case", f"{number}/{total} {case.name}", case=case.name,
                       index=number, total=total)
        try:
            if folds is not None:
                fold = folds.fold[case.subject]
                m = _detected(case, replace(detector, threshold=folds.thresholds[fold]),
                              progress) | {"site_fold": fold + 1}
            elif results is None:
                m = _detected(case, detector, progress)
            else:
                m, report = _from_results(case, Path(results), progress)
                model = model or {"path": report.get("model", {}).get("path"),
                                  "config": report.get("model", {}).get("config"),
                                  "threshold": report.get("threshold"),
                                  "staging": report.get("staging"),
                                  "results": str(results)}
        except InputError as exc:
            raise InputError(f"{labels.path} row {case.row} ({case.file.name}): {exc}") from None
        measured.append(m)
        progress.event("result", f"{case.name}: anomaly score {m['anomaly_score']:.3f}, "
                       f"EI {m['emphysema_index_percent']:.2f} %, stage {m['stage']}",
                       case=case.name, anomaly_score=m["anomaly_score"],
                       stage=m["stage"])
    partial = sum(m.get("coverage") == PARTIAL for m in measured)
    if partial:  # once, not per image: a cohort of single slices is all partial
        progress.log(f"{partial} of {total} images cover only part of the lungs (single "
                     "slices or ROIs, for example); every measure compares what was scanned.",
                     "warning")
    loud = [c.name for c, m in zip(labels.cases, measured) if noisy(m.get("lung_noise_hu"))]
    if loud:
        progress.log(f"{len(loud)} of {total} images have lung noise above {NOISE_WARN_HU:.0f} "
                     f"HU ({', '.join(loud[:5])}{', ...' if len(loud) > 5 else ''}; "
                     "lung_noise_hu in cases.csv): noise can be flagged as emphysema, so their "
                     "scores are less reliable.", "warning")
    hu_scale = hu_scale_text(measured)
    if hu_scale:
        progress.log(hu_scale, "warning")
    if detector is not None:
        from .inference import precision  # torch: only where a detector ran

        model = {"path": detector.model_path, "config": detector.config,
                 "threshold": detector.threshold, "staging": detector.staging.to_dict(),
                 "device": str(detector.device), "precision": precision(detector.device)}
        if folds is not None:
            model |= {"threshold": None, "site_folds": folds.record}
    return measured, model


# --- site threshold folds --------------------------------------------------------------------
def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def subject_folds(subjects, folds: int) -> dict[str, int]:
    """Fold (0-based) of each subject: subjects in natural order (subject2 before subject10)
    dealt round-robin, so the folds are balanced and the split is the same on every run."""
    return {s: i % folds for i, s in enumerate(sorted(set(subjects), key=_natural))}


@dataclass
class SiteFolds:
    """Each fold's threshold, set as `site-threshold` sets one, from the normal images of
    the other folds' subjects: every image is scored at a threshold its subject never set."""

    fold: dict[str, int]  # subject -> fold
    thresholds: list[float]
    record: dict  # for the report


def site_folds(labels: Labels, detector, folds: int, percentile: float,
               progress: Progress = NO_PROGRESS) -> SiteFolds:
    from .site_threshold import HealthyScores, check_percentile, lung_scores, threshold_of

    check_percentile(percentile)
    if folds < 2:
        raise InputError(f"--site-folds must be 2 or more (got {folds}).")
    if folds > len(labels.subjects):
        raise InputError(f"--site-folds {folds} needs at least {folds} subjects; "
                         f"{labels.path} has {len(labels.subjects)}.")
    fold = subject_folds(labels.subjects, folds)
    normals = [c for c in labels.cases if not c.emphysema]
    progress.event("site_folds", f"site threshold folds: scoring the {len(normals)} normal "
                   "images", images=len(normals), folds=folds)
    scores = HealthyScores()
    for number, case in enumerate(normals, 1):
        progress.event("case", f"normal {number}/{len(normals)} {case.name}", case=case.name,
                       index=number, total=len(normals))
        try:
            # a shifted scale is counted once for the cohort (score_cases)
            scores.add(case.name, *lung_scores(case.file, detector, progress, warn=False))
        except InputError as exc:
            raise InputError(f"{labels.path} row {case.row} ({case.file.name}): {exc}"
                             ) from None
    thresholds, record = [], []
    for k in range(folds):
        others = [i for i, c in enumerate(normals) if fold[c.subject] != k]
        where = f"the threshold of fold {k + 1} (from the other folds' normal images)"
        if not others:
            raise InputError(f"{where}: those subjects have no normal image; use fewer folds "
                             "or add normal images.")
        try:
            result = threshold_of(scores.subset(others), percentile)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        thresholds.append(result.threshold)
        record.append({"fold": k + 1,
                       "subjects": sum(f == k for f in fold.values()),
                       "images": sum(fold[c.subject] == k for c in labels.cases),
                       "threshold": result.threshold, "normal_images_used": len(others),
                       "clipped": bool(result.clipped)})
        progress.log(f"fold {k + 1}: threshold {result.threshold:.4f} from {len(others)} "
                     "normal images of the other folds")
    return SiteFolds(fold, thresholds, {
        "folds": folds, "percentile": percentile,
        "split": "subjects in natural order, dealt round-robin",
        "thresholds": record})


# --- metrics -------------------------------------------------------------------------------
def _metric_rows(labels: Labels) -> list[dict]:
    """The score metrics this CSV supports: key, label and how many cases of each class."""
    cases = labels.cases
    rows = []
    normal = sum(not c.emphysema for c in cases)
    rows.append({"key": "auroc", "label": "AUROC normal vs emphysema",
                 "n": f"{normal} vs {len(cases) - normal}"})
    for pattern in labels.patterns:
        n = sum(c.pattern == pattern for c in cases)
        rows.append({"key": f"auroc:{pattern}", "label": f"AUROC normal vs {pattern}",
                     "pattern": pattern, "n": f"{normal} vs {n}"})
    if "severity" in labels.columns:
        rows.append({"key": "spearman_severity", "label": "Spearman with severity",
                     "n": f"{len(cases)}"})
    return rows


def _stage_rows(labels: Labels) -> list[dict]:
    if "severity" in labels.columns:
        sensitivity = f"staged above None, severity >= {SENSITIVITY_SEVERITY}"
    elif "stage" in labels.columns:
        sensitivity = "staged above None, reference stage above None"
    else:
        sensitivity = "staged above None, emphysema"
    rows = [{"key": "sensitivity", "label": f"sensitivity: {sensitivity}"},
            {"key": "specificity", "label": "specificity: normal staged None"}]
    if labels.stage_source:
        rows.append({"key": "agreement", "label": "stage agreement with the reference"})
    return rows


class _Arrays:
    """The labels and scores as arrays, for fast metrics on any sample of case indices."""

    def __init__(self, labels: Labels, measured: list[dict]):
        cases = labels.cases
        self.emphysema = np.array([c.emphysema for c in cases])
        self.pattern = np.array([c.pattern or "" for c in cases], dtype=object)
        self.severity = np.array([np.nan if c.severity is None else c.severity for c in cases])
        self.reference = np.array([c.stage or "" for c in cases], dtype=object)
        self.stage = np.array([m["stage"] or "" for m in measured], dtype=object)
        self.scores = {s.key: np.array([_value(s, m) for m in measured]) for s in SCORES}
        if "severity" in labels.columns:
            self.sensitive = self.severity >= SENSITIVITY_SEVERITY
        elif "stage" in labels.columns:
            self.sensitive = self.reference != "None"
        else:
            self.sensitive = self.emphysema.copy()
        self.metric_rows = _metric_rows(labels)
        self.stage_rows = _stage_rows(labels)

    def statistic(self, idx) -> dict[str, float]:
        idx = np.asarray(idx, dtype=int)
        out = {}
        truth = self.emphysema[idx]
        for row in self.metric_rows:
            for key, values in self.scores.items():
                v = values[idx]
                if row["key"] == "auroc":
                    value = metrics.case_auroc(v, truth) if 0 < truth.sum() < len(truth) \
                        else np.nan
                elif "pattern" in row:
                    p = self.pattern[idx]
                    keep = (p == NORMAL) | (p == row["pattern"])
                    t = p[keep] == row["pattern"]
                    value = metrics.case_auroc(v[keep], t) if 0 < t.sum() < len(t) else np.nan
                else:
                    value = metrics.spearman(v, self.severity[idx])
                out[f"{row['key']}|{key}"] = value
        stage, reference = self.stage[idx], self.reference[idx]
        sensitive, normal = self.sensitive[idx], ~truth
        out["stage|sensitivity"] = np.mean(stage[sensitive] != "None") if sensitive.any() \
            else np.nan
        out["stage|specificity"] = np.mean(stage[normal] == "None") if normal.any() else np.nan
        out["stage|agreement"] = np.mean(stage == reference) if len(idx) else np.nan
        return out


def _value(score: Score, m: dict) -> float:
    try:
        value = score.get(m)
    except (KeyError, TypeError):
        return float("nan")
    return float("nan") if value is None else float(value)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _entry(value, interval, n_boot) -> dict:
    value = None if value is None or not np.isfinite(value) else round(float(value), 4)
    out = {"value": value, "ci95": None, "resamples": 0}
    if interval is not None:
        low, high, used = interval
        if np.isfinite(low):
            out["ci95"] = [round(low, 4), round(high, 4)]
        out["resamples"] = used
    return out


def compute_metrics(labels: Labels, measured: list[dict], n_boot: int = DEFAULT_BOOTSTRAP,
                    seed: int = 0, progress: Progress = NO_PROGRESS) -> dict:
    """Every metric of every score, the model's stage table, and subject-bootstrap
    intervals (all metrics on the same resamples, so they compare as pairs)."""
    if n_boot < 0:
        raise InputError(f"--bootstrap must be 0 (no intervals) or more (got {n_boot}).")
    arrays = _Arrays(labels, measured)
    point = arrays.statistic(np.arange(len(labels.cases)))
    intervals = {}
    if n_boot:
        progress.event("bootstrap", f"95 % intervals: {n_boot} resamples of the "
                       f"{len(labels.subjects)} subjects", resamples=n_boot)
        intervals = metrics.cluster_bootstrap(arrays.statistic,
                                              [c.subject for c in labels.cases], n_boot, seed)
    score_metrics = []
    for row in arrays.metric_rows:
        values = {s.key: _entry(point[f"{row['key']}|{s.key}"],
                                intervals.get(f"{row['key']}|{s.key}"), n_boot) for s in SCORES}
        score_metrics.append({k: v for k, v in row.items() if k != "pattern"}
                             | {"values": values})
    stage_metrics = []
    for row in arrays.stage_rows:
        entry = _entry(point[f"stage|{row['key']}"], intervals.get(f"stage|{row['key']}"),
                       n_boot)
        population = {"sensitivity": arrays.sensitive, "specificity": ~arrays.emphysema,
                      "agreement": np.ones(len(labels.cases), bool)}[row["key"]]
        hits = {"sensitivity": arrays.stage != "None", "specificity": arrays.stage == "None",
                "agreement": arrays.stage == arrays.reference}[row["key"]]
        stage_metrics.append({**row, **entry, "count": int(np.sum(hits & population)),
                              "of": int(population.sum())})
    confusion = None
    if labels.stage_source:
        counts = [[int(np.sum((arrays.reference == r) & (arrays.stage == p))) for p in STAGES]
                  for r in STAGES]
        confusion = {"rows": "reference stage", "columns": "model stage",
                     "stages": list(STAGES), "counts": counts}
    return {
        "scores": [{"key": s.key, "label": s.label, "unit": s.unit,
                    **({"note": SCORE_NOTES[s.key]} if s.key in SCORE_NOTES else {})}
                   for s in SCORES],
        "metrics": score_metrics,
        "staging": {"reference": labels.stage_source, "metrics": stage_metrics,
                    "confusion": confusion},
        "leave_one_subject_out": _leave_one_out(labels, arrays),
        "bootstrap": {"unit": "subject", "subjects": len(labels.subjects),
                      "resamples": n_boot, "seed": seed, "level": 0.95},
    }


def _leave_one_out(labels: Labels, arrays: _Arrays) -> list[dict]:
    """For each subject, the AUROC normal vs emphysema of every score without its images:
    which subjects the ranking's errors come from (a case to re-read, or one unlike the rest)."""
    if len(labels.subjects) < 3:
        return []
    subjects = np.array([c.subject for c in labels.cases])
    rows = []
    for subject in labels.subjects:
        rest = arrays.statistic(np.flatnonzero(subjects != subject))
        mine = arrays.emphysema[subjects == subject]
        rows.append({"subject": subject, "normal": int((~mine).sum()),
                     "emphysema": int(mine.sum()),
                     "auroc_without": {s.key: _finite(rest[f"auroc|{s.key}"]) for s in SCORES}})
    return rows


# --- outputs -------------------------------------------------------------------------------
def _cell(entry: dict, digits: int = 2) -> str:
    if entry["value"] is None:
        return "n/a"
    text = f"{entry['value']:.{digits}f}"
    if entry["ci95"] is not None:
        low, high = entry["ci95"]
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def markdown(report: dict) -> str:
    result = report["metrics"]
    boot = result["bootstrap"]
    cases = report["cases"]
    labels = ", ".join(report["label_columns"])
    model = report["model"] or {}
    hu_scale = hu_scale_text(cases)
    lines = [f"# Validation on {Path(report['labels']).name}", "",
             f"{len(cases)} images of {boot['subjects']} subjects (labels: {labels}); model "
             f"`{Path(str(model.get('path'))).name}` ({threshold_text(model)}); "
             f"EmphysemaUAD {report['software']['version']}.",
             "95 % intervals: percentile bootstrap over subjects, "
             f"{boot['resamples']} resamples (seed {boot['seed']})." if boot["resamples"]
             else "No intervals (--bootstrap 0).",
             *([hu_scale] if hu_scale else []),
             "Every score is oriented so that higher means more emphysema; "
             + "; ".join(f"{s['label']} {s['note']}" for s in result["scores"] if "note" in s)
             + ".", "",
             "| metric | " + " | ".join(s["label"] for s in result["scores"]) + " |",
             "|---" * (len(result["scores"]) + 1) + "|"]
    fewer = []
    for row in result["metrics"]:
        cells = [_cell(row["values"][s["key"]]) for s in result["scores"]]
        lines.append(f"| {row['label']} ({row['n']}) | " + " | ".join(cells) + " |")
        for s in result["scores"]:
            used = row["values"][s["key"]]["resamples"]
            if boot["resamples"] and used < boot["resamples"]:
                fewer.append((row["label"], s["label"], used))
    if fewer:
        by_metric: dict[str, set] = {}
        for metric, _, used in fewer:
            by_metric.setdefault(metric, set()).add(used)
        lines += ["", "Resamples used where some lacked a class (those are skipped): " + "; ".join(
            f"{metric}: {'-'.join(str(u) for u in sorted(used)) if len(used) > 1 else min(used)}"
            f" of {boot['resamples']}" for metric, used in by_metric.items()) + "."]
    lines += _leave_one_out_table(result)
    staging = result["staging"]
    lines += ["", "## Model stage", ""]
    if staging["reference"]:
        lines += [f"Reference stage: {staging['reference']}.", ""]
    lines += ["| metric | value |", "|---|---|"]
    for row in staging["metrics"]:
        used = (f" ({row['resamples']} resamples)" if boot["resamples"] and
                row["resamples"] < boot["resamples"] else "")
        lines.append(f"| {row['label']} | {row['count']}/{row['of']} = {_cell(row)}{used} |")
    if staging["confusion"]:
        c = staging["confusion"]
        lines += ["", "Confusion matrix (rows: reference stage, columns: model stage)", "",
                  "| reference \\ model | " + " | ".join(c["stages"]) + " |",
                  "|---" * (len(c["stages"]) + 1) + "|"]
        lines += [f"| {stage} | " + " | ".join(str(n) for n in counts) + " |"
                  for stage, counts in zip(c["stages"], c["counts"])]
    if model.get("site_folds"):
        lines += _folds_table(model["site_folds"])
    return "\n".join(lines) + "\n"


LEAVE_ONE_OUT_SHOWN = 5


def _leave_one_out_table(result: dict) -> list[str]:
    """The subjects whose absence moves the model EI's AUROC most, each score's AUROC
    without them under the AUROC of all images."""
    rows = [r for r in result["leave_one_subject_out"]
            if r["auroc_without"]["model_ei"] is not None]
    overall = next((r for r in result["metrics"] if r["key"] == "auroc"), None)
    if not rows or overall is None or overall["values"]["model_ei"]["value"] is None:
        return []
    base = overall["values"]["model_ei"]["value"]
    rows.sort(key=lambda r: -abs(r["auroc_without"]["model_ei"] - base))
    scores = result["scores"]

    def cell(value):
        return "n/a" if value is None else f"{value:.2f}"
    lines = ["", "## Subjects that move the AUROC most", "",
             "AUROC normal vs emphysema with one subject's images left out, for the "
             f"{min(LEAVE_ONE_OUT_SHOWN, len(rows))} subjects whose absence moves the model "
             "EI's most (report.json lists every subject). A subject that alone carries much "
             "of the error is worth a second look at its images and labels.", "",
             "| left out (normal + emphysema images) | " + " | ".join(s["label"] for s in scores)
             + " |", "|---" * (len(scores) + 1) + "|",
             "| none (all images) | " + " | ".join(
                 cell(overall["values"][s["key"]]["value"]) for s in scores) + " |"]
    lines += [f"| {r['subject']} ({r['normal']} + {r['emphysema']}) | " + " | ".join(
        cell(r["auroc_without"][s["key"]]) for s in scores) + " |"
        for r in rows[:LEAVE_ONE_OUT_SHOWN]]
    return lines


def hu_scale_text(cases: list[dict]) -> str | None:
    """How many images had a shifted HU scale and whether it was taken off, in words (for
    the warning and the report alike); None when no image was shifted."""
    shifted = [c["hu_shift_hu"] for c in cases if c.get("hu_shift_hu")]
    if not shifted:
        return None
    done = sum(bool(c.get("hu_corrected")) for c in cases if c.get("hu_shift_hu"))
    return (f"{len(shifted)} of {len(cases)} images have a shifted HU scale (air outside the "
            f"body {-1000 + float(np.median(shifted)):.0f} HU in the median; hu_shift_hu in "
            "cases.csv); "
            + (f"{done} of them corrected (the default; --no-correct-hu keeps them)."
               if done else "kept as stored (--no-correct-hu): their densities and the "
               "model's input are shifted too."))


def threshold_text(model: dict) -> str:
    """The voxel threshold the report's images were scored at, in words."""
    folds = model.get("site_folds")
    if not folds:
        return f"threshold {model.get('threshold')}"
    values = [f["threshold"] for f in folds["thresholds"]]
    return (f"site thresholds {min(values):.4f}-{max(values):.4f}: each image scored at the "
            f"{folds['percentile']:g}th percentile of the normal images of the other folds' "
            f"subjects ({folds['folds']} folds)")


def _folds_table(folds: dict) -> list[str]:
    lines = ["", "## Site threshold folds", "",
             f"Subjects split into {folds['folds']} folds ({folds['split']}); each fold's "
             f"threshold is the {folds['percentile']:g}th percentile of the lung scores of the "
             "other folds' normal images, as `site-threshold` sets it.", "",
             "| fold | subjects | images | threshold | from normal images |", "|---|---|---|---|---|"]
    lines += [f"| {f['fold']} | {f['subjects']} | {f['images']} | {f['threshold']:.4f}"
              f"{' (clipped)' if f['clipped'] else ''} | {f['normal_images_used']} |"
              for f in folds["thresholds"]]
    return lines


def summary_text(report: dict) -> str:
    """A short fixed-width table for the terminal."""
    result = report["metrics"]
    width = max(len(f"{r['label']} ({r['n']})") for r in result["metrics"]) + 2
    lines = [" " * width + "".join(f"{s['label'][:19]:>21}" for s in result["scores"])]
    for row in result["metrics"]:
        lines.append(f"{row['label'] + ' (' + row['n'] + ')':<{width}}" + "".join(
            f"{_cell(row['values'][s['key']]):>21}" for s in result["scores"]))
    for row in result["staging"]["metrics"]:
        lines.append(f"model {row['label']}: {row['count']}/{row['of']} = {_cell(row)}")
    if (report["model"] or {}).get("site_folds"):
        lines.append(threshold_text(report["model"]))
    return "\n".join(lines)


def case_rows(labels: Labels, measured: list[dict]) -> list[dict]:
    rows = []
    for case, m in zip(labels.cases, measured):
        rows.append({"row": case.row, "case": case.name, "file": str(case.file),
                     "subject": case.subject, **case.extra, "pattern": case.pattern,
                     "severity": case.severity, "reference_stage": case.stage,
                     "model_stage": m.get("stage"), "anomaly_score": m.get("anomaly_score"),
                     **{f"score_{s.key}": _finite(_value(s, m)) for s in SCORES},
                     "volume_ml": m.get("volume_ml"),
                     "emphysema_index_percent": m.get("emphysema_index_percent"),
                     "laa950_percent": m.get("laa950_percent"),
                     "laa910_percent": m.get("laa910_percent"),
                     "perc15_hu": m.get("perc15_hu"),
                     "mean_anomaly": m.get("mean_anomaly"),
                     "lung_noise_hu": m.get("lung_noise_hu"),
                     "hu_shift_hu": m.get("hu_shift_hu"),
                     "hu_corrected": m.get("hu_corrected"),
                     "threshold": m.get("threshold"),
                     **({"site_fold": m["site_fold"]} if "site_fold" in m else {})})
    return rows


def cases_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return buffer.getvalue()


def _x_axis(report: dict):
    """(label, value per case, ticks) of the plot's x axis: severity, else reference stage,
    else normal / emphysema."""
    cases = report["cases"]
    if "severity" in report["label_columns"]:
        return "severity", [c["severity"] for c in cases], [(v, str(v)) for v in range(6)]
    if "stage" in report["label_columns"]:
        return ("reference stage", [STAGES.index(c["reference_stage"]) for c in cases],
                list(enumerate(STAGES)))
    return ("pattern", [int(c["pattern"] != NORMAL) for c in cases],
            [(0, "normal"), (1, "emphysema")])


def score_chart(report: dict):
    """One panel per score: each image as a point at its severity (coloured by pattern,
    spread sideways a little), and the median of each severity joined by a line."""
    from .plots import COLORS, new_figure

    cases = report["cases"]
    x_label, x, ticks = _x_axis(report)
    x = np.asarray(x, float)
    by_pattern = "pattern" in report["label_columns"]
    member = np.array([c["pattern"] if by_pattern else "all" for c in cases], dtype=object)
    jitter = np.zeros(len(cases))
    for value in np.unique(x):
        same = np.flatnonzero(x == value)
        jitter[same] = np.linspace(-0.25, 0.25, len(same)) if len(same) > 1 else 0.0
    scores = report["metrics"]["scores"]
    model = report["model"] or {}
    ei_note = ("at the folds' site thresholds" if model.get("site_folds")
               else f"at threshold {model.get('threshold')}")
    fig, axes = new_figure(3.0 * len(scores), 3.6, panels=len(scores))
    for ax, score in zip(axes, scores):
        key = score["key"]
        raw = key == "perc15"  # shown in HU, as read (ranked as -Perc15)
        y = np.array([np.nan if c[f"score_{key}"] is None else c[f"score_{key}"]
                      for c in cases], float)
        y = -y if raw else y
        for k, group in enumerate(dict.fromkeys(member)):
            on = member == group
            ax.scatter((x + jitter)[on], y[on], s=16, color=COLORS[k % len(COLORS)],
                       label=group, alpha=0.8, edgecolors="none")
        levels = [v for v, _ in ticks if np.any(x == v)]
        medians = [np.nanmedian(y[x == v]) if np.isfinite(y[x == v]).any() else np.nan
                   for v in levels]
        ax.plot(levels, medians, color="black", linewidth=1.5, label="median")
        unit = f" ({score['unit']})" if score.get("unit") else ""
        ax.set_title(f"{score['label']}{unit}" + ("\nlower = more" if raw else "")
                     + (f"\n{ei_note}" if key == "model_ei" else ""), fontsize=9)
        ax.set_xticks([v for v, _ in ticks], [label for _, label in ticks])
        ax.set_xlim(ticks[0][0] - 0.5, ticks[-1][0] + 0.5)
        ax.set_xlabel(x_label)
        ax.grid(True, axis="y", color="0.88")
    axes[0].legend(loc="best", fontsize=7)
    return fig


def write_outputs(report: dict, output_dir) -> list[Path]:
    """report.json, report.md, cases.csv and scores_by_severity.png, each written whole then
    renamed into place."""
    from .atomic import write_text_atomic
    from .plots import save_figure

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    x_label = _x_axis(report)[0].replace(" ", "_")
    return [write_text_atomic(folder / "report.json", json.dumps(report, indent=1)),
            write_text_atomic(folder / "report.md", markdown(report)),
            write_text_atomic(folder / "cases.csv", cases_csv(report["cases"])),
            save_figure(score_chart(report), folder / f"scores_by_{x_label}.png")]


# --- the command ------------------------------------------------------------------------
def validate(labels_path, output_dir, model=None, results=None, device="auto",
             n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, progress: Progress = NO_PROGRESS,
             site_folds_n: int | None = None, percentile: float | None = None,
             correct_hu: bool | None = None) -> tuple[dict, list[Path]]:
    """Everything `emphysema-uad validate` does: read and check the CSV, score every image
    (with `site_folds_n`, at the site threshold of its subject's fold: SiteFolds), compute
    the metrics, write the outputs. Nothing is written when anything fails first."""
    if n_boot < 0:
        raise InputError(f"--bootstrap must be 0 (no intervals) or more (got {n_boot}).")
    if results is not None and model is not None:
        raise InputError("--model and --results exclude each other: the results folder "
                         "already holds the model's output.")
    if results is not None and site_folds_n is not None:
        raise InputError("--site-folds and --results exclude each other: the folds' "
                         "thresholds need the network's scores, which a results folder "
                         "holds already thresholded.")
    if results is not None and correct_hu is not None:
        raise InputError("--correct-hu / --no-correct-hu and --results exclude each other: the "
                         "detect run that wrote the results decided (its report.json says).")
    if percentile is not None and site_folds_n is None:
        raise InputError("--percentile sets the threshold of --site-folds; give both.")
    if results is not None and not Path(results).is_dir():
        raise InputError(f"{results}: no such detect results folder.")
    labels = read_labels(labels_path)
    progress.event("start", f"validating {len(labels.cases)} images of "
                   f"{len(labels.subjects)} subjects from {labels.path}",
                   cases=len(labels.cases), subjects=len(labels.subjects))
    detector = None
    if results is None:
        from .detection import Detector
        detector = Detector.load(model, device, correct_hu=correct_hu)
    folds = None
    if site_folds_n is not None:
        from .site_threshold import DEFAULT_PERCENTILE

        folds = site_folds(labels, detector, site_folds_n,
                           DEFAULT_PERCENTILE if percentile is None else percentile, progress)
    measured, model_info = score_cases(labels, detector, results, progress, folds)
    result = compute_metrics(labels, measured, n_boot, seed, progress)
    import torch

    report = {
        "format": REPORT_FORMAT, "version": 1,
        "labels": str(labels.path),
        "label_columns": list(labels.columns),
        "severity_to_stage": {str(k): v for k, v in SEVERITY_STAGES.items()},
        "software": {"name": "EmphysemaUAD", "version": __version__,
                     "python": platform.python_version(), "torch": torch.__version__},
        "model": model_info,
        "source": "detect results folder" if results is not None else "detection",
        "metrics": result,
        "cases": case_rows(labels, measured),
    }
    written = write_outputs(report, output_dir)
    progress.event("done", f"{len(labels.cases)} images validated; report: "
                   f"{written[1]}", files=[str(p) for p in written])
    return report, written
