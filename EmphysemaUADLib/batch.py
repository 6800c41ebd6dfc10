"""Detection over many inputs: one folder per case and a triage worklist (summary.csv).

A case that fails is reported in the summary with its error and the batch goes on; the
summary is rewritten after every case so an interrupted batch keeps what it finished.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from pathlib import Path

from .detection import CaseResult, Detector, detect_case
from .errors import InputError
from .progress import NO_PROGRESS, Progress
from .report import summary_row, write_case, write_summary
from .volume_io import case_name, cases_of_input, read_ct


def collect_cases(inputs: list[str]) -> list[tuple[str, Path | None, str | None]]:
    """(unique case name, path, error) for every case the inputs name."""
    found: list[tuple[str, Path | None, str | None]] = []
    for item in inputs:
        try:
            found += [(case_name(p), p, None) for p in cases_of_input(item)]
        except InputError as exc:
            found.append((case_name(Path(item)) or str(item), None, str(exc)))
    seen: Counter = Counter()
    unique = []
    for name, path, error in found:
        seen[name] += 1
        unique.append((name if seen[name] == 1 else f"{name}_{seen[name]}", path, error))
    return unique


def run_batch(inputs: list[str], output_dir: str | Path, detector: Detector, lobes=None,
              progress: Progress = NO_PROGRESS) -> int:
    """Returns the number of failed cases."""
    output_dir = Path(output_dir)
    cases = collect_cases(inputs)
    if lobes is not None and len(cases) != 1:
        raise InputError(f"lobes belong to one case, but the inputs hold {len(cases)} cases; "
                         "run the cases with lobes one at a time.", "lobes")
    rows = []
    summary = output_dir / "summary.csv"
    for number, (name, path, error) in enumerate(cases, 1):
        progress.event("case", f"{number}/{len(cases)} {name}", case=name, index=number,
                       total=len(cases))
        result = None
        if error is None:
            result, error = _detect_one(path, name, output_dir, detector, lobes, progress)
        if error is not None:
            progress.event("case_error", f"{name}: {error}", case=name, error=error)
        rows.append(summary_row(name, result, error))
        write_summary(rows, summary)
    failed = sum(1 for r in rows if r["error"])
    progress.event("done", f"{len(rows) - failed} of {len(rows)} cases done; worklist: "
                   f"{summary}", summary=str(summary), failed=failed, cases=len(rows))
    return failed


def _detect_one(path: Path, name: str, output_dir: Path, detector: Detector, lobes,
                progress: Progress) -> tuple[CaseResult | None, str | None]:
    """One case read, detected and written: (result, None), or (None, error)."""
    start = time.perf_counter()
    try:
        ct = read_ct(path, progress)
        read_s = time.perf_counter() - start
        result = detect_case(ct, detector, lobes=lobes, progress=progress)
        result.timings = {"read": round(read_s, 3), **result.timings}
        folder = write_case(result, detector, name, output_dir)
        result.timings["total"] = round(time.perf_counter() - start, 3)
    except InputError as exc:
        return None, str(exc)
    except Exception as exc:  # one broken case must not stop the batch
        progress.log("".join(traceback.format_exception(exc)), level="debug")
        return None, f"{type(exc).__name__}: {exc}"
    whole = result.measurements.whole
    progress.event("result", f"{name}: stage {whole.stage}, emphysema index "
                   f"{whole.emphysema_index_percent:.2f} % -> {folder}", case=name,
                   folder=str(folder), stage=whole.stage, anomaly_score=result.anomaly_score,
                   timings_s=result.timings)
    return result, None
