"""Detection over many inputs: one folder per case and a triage worklist (summary.csv).

A case that fails is reported in the summary with its error and the batch goes on; the
summary is rewritten after every case so an interrupted batch keeps what it finished.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .atomic import check_output_folder
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


@dataclass
class BatchResult:
    cases: int
    done: int
    refused: int  # cases refused as bad input (InputError)
    failed: int  # cases that failed otherwise

    @property
    def exit_code(self) -> int:
        """0: every case done; 2: nothing done and every case refused as bad input; 1: some
        cases failed (the others are done), or a case failed for another reason."""
        if self.refused + self.failed == 0:
            return 0
        return 2 if self.done == 0 and self.failed == 0 else 1


def plan_batch(inputs: list[str], output_dir: str | Path, lobes=None):
    """The cases of a batch, checked before any work: the output folder can be written, at
    least one input names a case, lobes go with one case. InputError otherwise."""
    check_output_folder(output_dir)
    cases = collect_cases(inputs)
    if all(error for _, _, error in cases):
        errors = [error for _, _, error in cases]
        more = f" (and {len(errors) - 1} more input(s) refused)" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)
    if lobes is not None and len(cases) != 1:
        raise InputError(f"lobes belong to one case, but the inputs hold {len(cases)} cases; "
                         "run the cases with lobes one at a time.", "lobes")
    return cases


def run_batch(inputs: list[str], output_dir: str | Path, detector: Detector, lobes=None,
              progress: Progress = NO_PROGRESS, cases=None) -> BatchResult:
    """Detect every case of `inputs` (or of `cases` from plan_batch). The worklist is written
    once a case is done and rewritten after every case; a batch where nothing is done
    writes nothing. A failed write (disk full, ...) stops the batch: OSError."""
    output_dir = Path(output_dir)
    if cases is None:
        cases = plan_batch(inputs, output_dir, lobes)
    rows = []
    refused = failed = 0
    summary = output_dir / "summary.csv"
    for number, (name, path, error) in enumerate(cases, 1):
        progress.event("case", f"{number}/{len(cases)} {name}", case=name, index=number,
                       total=len(cases))
        result, bad_input = None, error is not None
        if error is None:
            result, error, bad_input = _detect_one(path, name, output_dir, detector, lobes,
                                                   progress)
        if error is not None:
            refused += bad_input
            failed += not bad_input
            progress.event("case_error", f"{name}: {error}", case=name, error=error)
        rows.append(summary_row(name, result, error))
        if any(not r["error"] for r in rows):
            write_summary(rows, summary)
    done = len(rows) - refused - failed
    where = f"; worklist: {summary}" if done else "; nothing written"
    progress.event("done", f"{done} of {len(rows)} cases done{where}",
                   summary=str(summary) if done else None, failed=refused + failed,
                   cases=len(rows))
    return BatchResult(len(rows), done, refused, failed)


def _detect_one(path: Path, name: str, output_dir: Path, detector: Detector, lobes,
                progress: Progress) -> tuple[CaseResult | None, str | None, bool]:
    """One case read, detected and written: (result, None, False), or (None, error, whether
    the input was refused). Write failures are raised (OSError): they stop the batch."""
    start = time.perf_counter()
    try:
        ct = read_ct(path, progress)
        read_s = time.perf_counter() - start
        result = detect_case(ct, detector, lobes=lobes, progress=progress)
        result.timings = {"read": round(read_s, 3), **result.timings}
    except InputError as exc:
        return None, str(exc), True
    except MemoryError:
        return None, "out of memory; try a smaller batch size", False
    except Exception as exc:  # one broken case must not stop the batch
        progress.log("".join(traceback.format_exception(exc)), level="debug")
        return None, f"{type(exc).__name__}: {exc}", False
    folder = write_case(result, detector, name, output_dir)
    result.timings["total"] = round(time.perf_counter() - start, 3)
    whole = result.measurements.whole
    progress.event("result", f"{name}: stage {whole.stage}, emphysema index "
                   f"{whole.emphysema_index_percent:.2f} % -> {folder}", case=name,
                   folder=str(folder), stage=whole.stage, anomaly_score=result.anomaly_score,
                   timings_s=result.timings)
    return result, None, False
