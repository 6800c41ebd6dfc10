"""Detection of one CT, end to end: lungs -> regions -> network -> label map -> stages.

`detect_case` returns everything in memory (the Slicer glue maps it onto nodes);
`write_case` writes the files of one case; the batch over many inputs is in `batch.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .calibration import HuCheck, check_hu, corrected
from .checkpoint import load_model, model_file
from .density import LungDensity, air_level
from .devices import choose_device
from .errors import InputError, setting_error
from .inference import predict_ct
from .lungs import one_lung_note
from .measurements import (NOISE_WARN_HU, NOT_IN_SCAN, PARTIAL, Measurements,
                           RegionMeasurements, lung_noise_hu, measure, noisy, off_site_noise,
                           region_masks)
# the bundled model and its threshold live in modelinfo (no torch: Slicer reads them too)
from .modelinfo import (DEFAULT_MODEL_NAME, DEFAULT_THRESHOLD,  # noqa: F401
                        default_model_path, site_correct_hu)
from .progress import NO_PROGRESS, Progress
from .regions import (LEFT, LOBES, RIGHT, ZONES, cut_by_field, cut_ends, field_edge,
                      lung_zones, read_regions, superior_axis)
from .roi import find_lungs, is_roi
from .staging import Staging
from .volume_io import Volume


# Slices per network batch. On the CPU one slice at a time is fastest (with channels-last
# tensors, inference.py): the forward over the real thorax CT's 122 lung-box slices took
# 9.9 s at batch 8 and 7.8 s at 1 on 2 cores (scripts/bench_cpu_network.py). GPUs want more.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 1, 8


def default_batch_size(device: torch.device) -> int:
    return CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE


@dataclass
class Detector:
    """A loaded model with the settings that turn its map into labels and stages."""

    model: torch.nn.Module
    config: dict
    model_path: str
    device: torch.device
    threshold: float
    staging: Staging
    batch_size: int
    correct_hu: bool = True  # take a shifted HU scale's shift off (calibration.py)

    @classmethod
    def load(cls, model_path=None, device="auto", threshold=None, staging=None,
             batch_size=None, correct_hu: bool | None = None) -> "Detector":
        path = model_file(model_path) if model_path else default_model_path()
        dev = choose_device(device)
        model, config = load_model(path, device=dev)
        if threshold is None:
            threshold = float(config.get("threshold", DEFAULT_THRESHOLD))
        if not 0.0 < threshold < 1.0:
            raise setting_error("threshold", f"must lie between 0 and 1 (got {threshold}).")
        if batch_size is None:
            batch_size = default_batch_size(dev)
        if correct_hu is None:  # a site threshold holds on scans read as it read its own
            correct_hu = site_correct_hu(config) is not False
        if batch_size < 1:
            raise setting_error("batch_size", f"must be at least 1 (got {batch_size}).")
        return cls(model, config, str(path), dev, threshold,
                   Staging.load(staging) if staging else Staging(), batch_size, correct_hu)

    def calibrated(self, ct: Volume, progress: Progress = NO_PROGRESS,
                   warn: bool = True) -> tuple[Volume, HuCheck]:
        """The CT as the network and the measures see it, and its HU check: a shifted scale
        is taken off with `correct_hu`, and otherwise, with `warn`, reported."""
        check = check_hu(ct)
        if not check.shifted:
            return ct, check
        name = ct.source or "CT"
        if self.correct_hu:
            progress.log(f"{name}: {check.describe()}, not -1000 and about -100: the HU "
                         f"scale's shift of {check.shift_hu:+.0f} HU is taken off "
                         "(--no-correct-hu, or \"Correct the HU scale\" unticked in Slicer, "
                         "keeps it).", "warning" if warn else "info")
            return corrected(ct, check), check
        if warn:
            progress.log(f"{name}: {check.describe()}, not -1000 and about -100: the HU scale "
                         f"seems shifted by {check.shift_hu:+.0f} HU and is kept as stored "
                         "(--no-correct-hu), which shifts every density measure and what the "
                         "model sees.", "warning")
        return ct, check

    def off_site_noise(self, noise_hu: float | None) -> str | None:
        """The lung noise range ("4-9 HU") of the healthy scans this model's threshold was set
        on (`site-threshold`) when a scan's noise lies far outside it; None otherwise, or when
        the threshold in use is not the site's."""
        site = self.config.get("site_threshold") or {}
        span = off_site_noise(noise_hu, site) if site.get("threshold") == self.threshold \
            else None
        if span is None:
            return None
        low, high = (f"{n:.0f}" for n in span)
        return f"{low if low == high else low + '-' + high} HU"

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
    region_kind: str  # "lobes", "zones", "regions" or "roi" (roi.py: the whole lung only)
    anomaly: np.ndarray
    emphysema: np.ndarray
    measurements: Measurements
    noise_hu: float | None = None  # measurements.lung_noise_hu
    timings: dict[str, float] = field(default_factory=dict)
    hu_check: HuCheck | None = None
    hu_corrected: bool = False  # whether `ct` is the input less hu_check's shift
    bullae_ml: float = 0.0  # lung air spaces over 1 cm across (density.py), in the label map
    diffuse_ml: float = 0.0  # lung in lobules at emphysema density (density.py), in the map

    @property
    def anomaly_score(self) -> float:
        """Mean anomaly probability over the lungs, in % (a soft emphysema index)."""
        mean = self.measurements.whole.mean_anomaly
        return 0.0 if mean is None else round(100.0 * mean, 4)


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 3)
        return result


def detect_case(ct: Volume, detector: Detector, lobes=None,
                progress: Progress = NO_PROGRESS, lungs: np.ndarray | None = None,
                warn: bool = True) -> CaseResult:
    """Detection and measurements of one CT. Regions the scan cuts off are marked partial
    and, with `warn`, warnings say so and flag strong noise (a caller that sums them up over
    a cohort passes False)."""
    timer = _Timer()
    source = ct
    ct, hu_check = timer("calibration", detector.calibrated, ct, progress, warn)
    if lungs is None:
        lungs = timer("lungs", find_lungs, ct)
    if not lungs.any():
        raise InputError(f"{ct.source or 'CT'}: no lung found; is this a chest CT?")
    roi = is_roi(lungs)
    one_lung = None if roi else one_lung_note(lungs)
    if warn and one_lung:
        progress.log(f"{ct.source or 'CT'}: {one_lung}", "warning")
    if roi:
        if lobes is not None:
            raise InputError(f"{ct.source or 'CT'}: an ROI of parenchyma (no whole lung in "
                             "it) has no lobes to measure; leave out the lobe map.")
        if warn:
            size = " x ".join(f"{n * s:.0f}" for n, s in zip(ct.shape, ct.geometry.spacing_zyx)
                              if n > 1)
            progress.log(f"{ct.source or 'CT'}: no whole lung in this small image ({size} "
                         "mm); measured as an ROI of parenchyma: its part at lung density.")
        regions, legend, kind = np.zeros(lungs.shape, np.uint8), {}, "roi"
    elif lobes is not None:
        regions, legend = timer("regions", read_regions, lobes, ct, lungs, progress)
        kind = "lobes" if all("lobe" in name for name in legend.values()) else "regions"
    else:
        regions = timer("regions", lung_zones, lungs, ct.geometry)
        legend, kind = {k: v for k, v in ZONES.items() if (regions == k).any()}, "zones"
    ends = cut_ends(lungs > 0, ct.geometry)
    edge = None if roi else timer("field", field_edge, ct.array, ct.geometry, lungs > 0)
    field_cut = edge is not None and cut_by_field(lungs > 0, edge, ct.geometry)
    if (ends or field_cut) and warn and not roi:
        cut = [" and ".join({"top": "the top (apices)", "bottom": "the bottom (bases)"}[e]
                            for e in ends) + " of the scan"] if ends else []
        owner = "its" if ends else "the scan's"
        cut += [f"the edge of {owner} field of view"] if field_cut else []
        progress.log(f"{ct.source or 'CT'}: the lungs reach {' and '.join(cut)}, which covers "
                     "only part of them; the regions cut off are marked partial"
                     + (" (every zone of a cut lung: zones are thirds of the part scanned)"
                        if ends and kind == "zones" and legend else "")
                     + ".", "warning")
    # zones are thirds of the height scanned: every zone of a lung the scan cuts is partial
    cut_lungs = np.isin(lungs, [side for side in (RIGHT, LEFT)
                                if kind == "zones" and ends and cut_ends(lungs == side,
                                                                         ct.geometry)])
    noise = timer("noise", lung_noise_hu, ct.array, lungs, superior_axis(ct.geometry)[0])
    if warn and noisy(noise):
        progress.log(f"{ct.source or 'CT'}: the lungs' fine-scale noise is about {noise:.0f} "
                     f"HU, above the {NOISE_WARN_HU:.0f} HU up to which the model was checked; "
                     "such noise makes air-dark speckle that can be flagged as emphysema. A "
                     "smoother kernel or thicker slices of the same scan give a more reliable "
                     "result.", "warning")
    site_noise = detector.off_site_noise(noise)
    if warn and site_noise:
        progress.log(f"{ct.source or 'CT'}: the lungs' noise, {noise:.0f} HU, is far from that "
                     f"of the healthy scans this model's threshold was set on ({site_noise}): "
                     "another kernel or dose? The threshold may not fit this scan; set one for "
                     "its kernel with `site-threshold`.", "warning")
    measured = dict(legend)
    if kind == "lobes":  # a lobe of the map that is not in the scanned lungs: "not in scan"
        measured.update({k: v for k, v in LOBES.items() if k not in legend})
    anomaly = timer("network", predict_ct, ct, lungs, detector.model,
                    detector.device, detector.batch_size, progress, detector.score)
    # what the network leaves out, added by density (density.py): the inside of large air
    # spaces, lobules at emphysema density, and the part of each lesion around its core
    hu_corrected = ct is not source
    density = timer("density", LungDensity, ct, lungs, air_level(hu_check, hu_corrected))
    bullae = timer("bullae", density.bullae)
    diffuse = timer("diffuse loss", density.diffuse_loss)
    anomaly[bullae | diffuse] = 1.0
    emphysema = timer("extent", density.extent,
                      (anomaly > detector.threshold) & (lungs > 0)).astype(np.uint8)

    def measure_all() -> Measurements:
        rows = []
        for name, mask in region_masks(lungs, regions, measured):
            row = RegionMeasurements(name, **measure(ct.array, mask, emphysema, anomaly,
                                                     ct.geometry.voxel_ml))
            if row.empty and (roi or name not in legend.values() and name in LOBES.values()):
                row.coverage = NOT_IN_SCAN  # an absent lobe, or a side an ROI does not have
            elif (ends and (cut_ends(mask, ct.geometry) or (mask & cut_lungs).any())
                  or field_cut and cut_by_field(mask, edge, ct.geometry)):
                row.coverage = PARTIAL
            if not row.empty:
                row.stage = detector.staging.stage(row.emphysema_index_percent)
                row.stage_probabilities = detector.staging.probabilities(
                    row.emphysema_index_percent)
            rows.append(row)
        return Measurements(rows)

    rows = timer("measurements", measure_all)
    return CaseResult(ct, lungs, regions, legend, kind, anomaly, emphysema, rows, noise,
                      timer.timings, hu_check, hu_corrected,
                      round(float(np.count_nonzero(bullae) * ct.geometry.voxel_ml), 2),
                      round(float(np.count_nonzero(diffuse & (emphysema > 0) & ~bullae)
                                  * ct.geometry.voxel_ml), 2))
