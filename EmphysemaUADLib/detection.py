"""Detection of one CT, end to end: lungs -> regions -> network -> label map -> stages.

`detect_case` returns everything in memory (the Slicer glue maps it onto nodes);
`write_case` writes the files of one case; the batch over many inputs is in `batch.py`.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import load_model
from .errors import InputError
from .inference import choose_device, predict_anomaly
from .lungs import segment_lungs
from .measurements import measure, region_masks
from .regions import ZONES, lung_zones, read_regions
from .staging import Staging
from .volume_io import Volume

DEFAULT_THRESHOLD = 0.5
DEFAULT_MODEL_NAME = "edlnet_default.pt"


def default_model_path() -> Path:
    """The bundled model: Resources/Models in a source checkout or Slicer install, or the
    package data of a pip install."""
    source_tree = Path(__file__).resolve().parents[1] / "Resources" / "Models"
    if (source_tree / DEFAULT_MODEL_NAME).is_file():
        return source_tree / DEFAULT_MODEL_NAME
    from importlib.resources import files
    try:
        return Path(str(files("EmphysemaUADLib.models") / DEFAULT_MODEL_NAME))
    except ModuleNotFoundError:
        # no pip install (e.g. inside Slicer) and no bundled model: the path where it would
        # be, so that loading says which file is missing
        return source_tree / DEFAULT_MODEL_NAME


@dataclass
class Detector:
    """A loaded model with the settings that turn its map into labels and stages."""

    model: torch.nn.Module
    config: dict
    model_path: str
    device: torch.device
    threshold: float
    staging: Staging
    batch_size: int = 8

    @classmethod
    def load(cls, model_path=None, device="auto", threshold=None, staging=None,
             batch_size=8) -> "Detector":
        path = Path(model_path) if model_path else default_model_path()
        dev = choose_device(device)
        model, config = load_model(path, device=dev)
        if threshold is None:
            threshold = float(config.get("threshold", DEFAULT_THRESHOLD))
        if not 0.0 < threshold < 1.0:
            raise InputError(f"--threshold must lie between 0 and 1 (got {threshold}).")
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1 (got {batch_size}).")
        return cls(model, config, str(path), dev, threshold,
                   Staging.load(staging) if staging else Staging(), batch_size)

    @property
    def score(self) -> str:
        """The voxel score the model was trained for (inference.SCORES)."""
        return self.config.get("score", "anomaly")


@dataclass
class CaseResult:
    ct: Volume
    lungs: np.ndarray
    regions: np.ndarray
    legend: dict[int, str]
    region_kind: str  # "lobes", "zones" or "regions"
    anomaly: np.ndarray
    emphysema: np.ndarray
    measurements: list[dict]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def whole_lung(self) -> dict:
        return self.measurements[0]

    @property
    def anomaly_score(self) -> float:
        """Mean anomaly probability over the lungs, in % (a soft emphysema index)."""
        mean = self.whole_lung["mean_anomaly"]
        return 0.0 if mean is None else round(100.0 * mean, 4)


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 3)
        return result


def detect_case(ct: Volume, detector: Detector, lobes=None, progress=None, log=None,
                lungs: np.ndarray | None = None) -> CaseResult:
    timer = _Timer()
    if lungs is None:
        lungs = timer("lungs", segment_lungs, ct)
    if not lungs.any():
        raise InputError(f"{ct.source or 'CT'}: no lung found; is this a chest CT?")
    if lobes is not None:
        regions, legend = timer("regions", read_regions, lobes, ct, lungs, log)
        kind = "lobes" if all("lobe" in name for name in legend.values()) else "regions"
    else:
        regions = timer("regions", lung_zones, lungs, ct.geometry)
        legend, kind = {k: v for k, v in ZONES.items() if (regions == k).any()}, "zones"
    anomaly = timer("network", predict_anomaly, ct.array, lungs, detector.model,
                    detector.device, detector.batch_size, progress, detector.score)
    emphysema = ((anomaly > detector.threshold) & (lungs > 0)).astype(np.uint8)

    def measure_all():
        rows = []
        for name, mask in region_masks(lungs, regions, legend):
            row = {"region": name, **measure(ct.array, mask, emphysema, anomaly,
                                             ct.geometry.voxel_ml)}
            index = row["emphysema_index_percent"]
            row["stage"] = None if index is None else detector.staging.stage(index)
            row["stage_probabilities"] = (None if index is None else
                                          detector.staging.probabilities(index))
            rows.append(row)
        return rows

    rows = timer("measurements", measure_all)
    return CaseResult(ct, lungs, regions, legend, kind, anomaly, emphysema, rows, timer.timings)


def report_dict(result: CaseResult, detector: Detector, case: str) -> dict:
    whole = result.whole_lung
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
        "stage": whole["stage"],
        "regions": result.measurements,
        "timings_s": result.timings,
    }
