"""A site's own voxel threshold: a high percentile of the model's scores in healthy lung.

The anomaly probabilities a model gives healthy lung depend on the scanner and its kernel:
the bundled model's 99.9th percentile of healthy lung voxels is 0.06-0.13 on the HRCT slices
of one scanner, 0.53 on a thin-slice thorax CT, 0.78 and 0.89 on one scan with a standard and
a sharp kernel. A fixed threshold of 0.5 then misses subtle emphysema on the first and lies
in the healthy tail of the last. Setting the threshold from a site's healthy CTs leaves
about (100 - percentile) % of a healthy lung of that site above it: 0.1 % at the default
99.9th percentile, a fifth of the 0.5 % cut-point of stage None, which leaves room for the
spread between healthy scans. Its emphysema index is at most that: `detect` counts only the
flags on lung at emphysema density (density.py). Scoring only those voxels here was tried:
on healthy scans of standard kernels fewer than 0.1 % of the lung's voxels are at that
density, so the percentile fell to the lowest threshold, and the network no longer chose.
No emphysema label is used, only scans the site calls healthy.

The result is a copy of the model whose config carries the threshold ("threshold", which
`detect` and the Slicer panel already use) and how it was set ("site_threshold": percentile,
scans, lung voxels, shares above it, the scans' lung noise range for detect's kernel check;
no file names, so the model can be shared).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .batch import collect_cases
from .checkpoint import save_checkpoint
from .detection import Detector
from .errors import InputError, setting_error
from .inference import predict_ct
from .measurements import lung_noise_hu
from .process import stop_requested
from .progress import NO_PROGRESS, Progress
from .regions import superior_axis
from .roi import find_lungs
from .staging import DEFAULT_CUTPOINTS
from .volume_io import read_ct

DEFAULT_PERCENTILE = 99.9
BINS = 10000  # score histogram over [0, 1]: thresholds to 1e-4
THRESHOLD_RANGE = (0.01, 0.99)  # what the Slicer panel's slider offers
MIN_VOXELS_ABOVE = 100  # lung voxels a percentile must leave above it to be estimated
# a "healthy" scan with this share of its lung above the threshold looks like emphysema
SUSPECT_PERCENT = DEFAULT_CUTPOINTS[0]
# healthy scans whose lung noise differs more than this (highest / lowest) likely mix kernels
NOISE_SPREAD = 3.0


@dataclass
class HealthyScores:
    """Histograms of the voxel scores of healthy lung, one per scan."""

    names: list[str] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    noise_hu: list[float | None] = field(default_factory=list)  # measurements.lung_noise_hu

    def add(self, name: str, scores: np.ndarray, noise_hu: float | None = None) -> None:
        counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))
        self.names.append(name)
        self.counts.append(counts.astype(np.int64))
        self.noise_hu.append(noise_hu)

    @property
    def noise_range(self) -> tuple[float, float] | None:
        known = [n for n in self.noise_hu if n is not None]
        return (min(known), max(known)) if known else None

    @property
    def voxels(self) -> int:
        return int(sum(c.sum() for c in self.counts))

    def threshold(self, percentile: float) -> float:
        """The smallest bin edge with at most (100 - percentile) % of all voxels above it."""
        pooled = np.sum(self.counts, axis=0)
        above = pooled[::-1].cumsum()[::-1]  # voxels in this bin and above
        allowed = (100.0 - percentile) / 100.0 * pooled.sum() + 1e-6  # 100 - 99.9 != 0.1
        within = np.flatnonzero(above <= allowed)
        return within[0] / BINS if len(within) else 1.0  # the top bin alone holds too many

    def subset(self, indices) -> "HealthyScores":
        """The scans at these positions, pooled on their own."""
        return HealthyScores([self.names[i] for i in indices],
                             [self.counts[i] for i in indices],
                             [self.noise_hu[i] for i in indices])

    def percent_above(self, threshold: float) -> list[float]:
        """Each scan's share of lung voxels at or above `threshold` (a bin edge), in %."""
        first = int(round(threshold * BINS))
        return [100.0 * float(c[first:].sum()) / max(int(c.sum()), 1) for c in self.counts]


@dataclass
class SiteThreshold:
    threshold: float
    percentile: float
    scores: HealthyScores
    clipped: bool  # the percentile lay outside THRESHOLD_RANGE
    refused: list[tuple[str, str]]  # (scan, why) of inputs that could not be used

    @property
    def percent_above(self) -> list[float]:
        return self.scores.percent_above(self.threshold)

    @property
    def mixed_noise(self) -> bool:
        """Whether the scans' lung noise spreads as far as different kernels do."""
        span = self.scores.noise_range
        return span is not None and span[1] > NOISE_SPREAD * max(span[0], 1.0)

    @property
    def suspects(self) -> list[tuple[str, float]]:
        """Scans whose share above the threshold reaches stage Mild: maybe not healthy."""
        return [(name, share) for name, share in zip(self.scores.names, self.percent_above)
                if share >= SUSPECT_PERCENT]

    def record(self, model_path) -> dict:
        """What the config of the site's model keeps of how its threshold was set."""
        shares = np.array(self.percent_above)
        noise = self.scores.noise_range
        return {"threshold": self.threshold, "percentile": self.percentile,
                "scans": len(self.scores.names), "lung_voxels": self.scores.voxels,
                "median_percent_above": round(float(np.median(shares)), 4),
                "max_percent_above": round(float(shares.max()), 4),
                "lung_noise_hu": [round(n, 1) for n in noise] if noise else None,
                "clipped": self.clipped, "from_model": Path(model_path).name,
                "made": datetime.date.today().isoformat(), "version": __version__}


def check_percentile(percentile: float) -> None:
    if not 90.0 <= percentile < 100.0:
        raise setting_error("percentile", f"must lie in [90, 100) (got {percentile}); 99.9 "
                                          "leaves 0.1 % of healthy lung above the threshold.")


def lung_scores(path, detector: Detector, progress: Progress = NO_PROGRESS, warn: bool = True
                ) -> tuple[np.ndarray, float | None]:
    """The voxel scores of a scan's lungs and its lung noise (InputError: unreadable, or no
    lung found); `warn`: about a shifted HU scale (Detector.calibrated)."""
    ct, _ = detector.calibrated(read_ct(path, progress), progress, warn)
    lungs = find_lungs(ct)
    if not lungs.any():
        raise InputError("no lung found; is this a chest CT?")
    anomaly = predict_ct(ct, lungs, detector.model, detector.device, detector.batch_size,
                         progress, detector.score)
    return anomaly[lungs > 0], lung_noise_hu(ct.array, lungs, superior_axis(ct.geometry)[0])


def healthy_scores(inputs: list[str], detector: Detector,
                   progress: Progress = NO_PROGRESS) -> tuple[HealthyScores, list]:
    """The voxel scores of the lungs of every healthy scan the inputs name, and the inputs
    refused (unreadable, no lung found) with why; other failures stop the run."""
    scores, refused = HealthyScores(), []
    cases = collect_cases(inputs)
    for number, (name, path, error) in enumerate(cases, 1):
        if stop_requested():  # the Slicer panel's Cancel (Ctrl-C arrives as such anyway)
            raise KeyboardInterrupt
        progress.event("case", f"{number}/{len(cases)} {name}", case=name, index=number,
                       total=len(cases))
        if error is None:
            try:
                scores.add(name, *lung_scores(path, detector, progress))
                continue
            except InputError as exc:
                error = str(exc)
        refused.append((name, error))
        progress.event("case_error", f"{name}: {error}", case=name, error=error)
    return scores, refused


def site_threshold(inputs: list[str], detector: Detector,
                   percentile: float = DEFAULT_PERCENTILE,
                   progress: Progress = NO_PROGRESS) -> SiteThreshold:
    check_percentile(percentile)
    scores, refused = healthy_scores(inputs, detector, progress)
    return threshold_of(scores, percentile, refused)


def threshold_of(scores: HealthyScores, percentile: float,
                 refused: list[tuple[str, str]] | None = None) -> SiteThreshold:
    """The threshold at `percentile` of the pooled scores of healthy scans."""
    refused = refused or []
    if not scores.names:
        raise InputError("no healthy scan could be used: "
                         + "; ".join(f"{name}: {why}" for name, why in refused[:3]))
    needed = int(np.ceil(MIN_VOXELS_ABOVE * 100.0 / (100.0 - percentile)))
    if scores.voxels < needed:
        raise InputError(f"the {len(scores.names)} healthy scan(s) hold {scores.voxels} lung "
                         f"voxels, too few for the {percentile:g}th percentile (it needs at "
                         f"least {needed}); give more healthy scans.")
    raw = scores.threshold(percentile)
    threshold = float(np.clip(raw, *THRESHOLD_RANGE))
    return SiteThreshold(threshold, percentile, scores, threshold != raw, refused)


def write_site_model(detector: Detector, output, result: SiteThreshold) -> Path:
    """A copy of the detector's model (already loaded and checked) whose config carries the
    site's threshold (no training state: the copy is for detection, not for resuming)."""
    config = {**detector.config, "threshold": result.threshold,
              "site_threshold": {**result.record(detector.model_path),
                                 "correct_hu": detector.correct_hu}}
    return save_checkpoint(output, detector.model.state_dict(), config)
