"""Clinical measurements of each region: volume, emphysema index, LAA%-950, Perc15, score.

`COLUMNS` is the one source of the measurement columns: their keys (report.json, summary.csv,
the Slicer table), human titles, units and one-line descriptions. `RegionMeasurements` is one
region's row; `Measurements` holds the rows of a case, whole lung first, then right and left
lung, then the regions (lobes or zones).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .lungs import LEFT, LUNG_NAMES, RIGHT

LAA_THRESHOLD_HU = -950.0


def laa_percent(values: np.ndarray, threshold_hu: float = LAA_THRESHOLD_HU) -> float:
    """Low-attenuation area: % of the values at or below the threshold (HU)."""
    return round(100.0 * np.count_nonzero(values <= threshold_hu) / values.size, 4)


def perc15_hu(values: np.ndarray) -> float:
    """The 15th percentile of the values, in HU."""
    return round(float(np.percentile(values, 15)), 2)


PARENCHYMA_BELOW_HU = -700.0  # lung voxels darker than this: parenchyma, not vessels
NOISE_SLICES = 24  # slices sampled, evenly, for the noise estimate
# Lung noise above which a result is flagged as unreliable: the noisiest real scans the
# bundled model was checked on read 41-49 HU (sharp kernels).
NOISE_WARN_HU = 55.0


def lung_noise_hu(hu: np.ndarray, lungs: np.ndarray, superior: int = 0) -> float | None:
    """Fine-scale noise in the lung parenchyma (HU): the robust spread (1.4826 x MAD) of each
    voxel's difference to its 3 x 3 in-plane median, inside the eroded lungs below
    PARENCHYMA_BELOW_HU; the median over up to NOISE_SLICES slices along the `superior`
    axis. It reads kernel and dose together (what makes air-dark speckle); None when no
    slice holds enough parenchyma."""
    from scipy import ndimage  # here: the Slicer glue imports this module for its columns

    hu, lungs = np.moveaxis(hu, superior, 0), np.moveaxis(lungs, superior, 0)
    levels = np.flatnonzero(lungs.any(axis=(1, 2)))
    spreads = []
    for z in levels[np.linspace(0, len(levels) - 1, min(NOISE_SLICES, len(levels))).astype(int)]:
        inside = ndimage.binary_erosion(lungs[z] > 0, iterations=3)
        image = hu[z].astype(np.float32)
        inside &= image < PARENCHYMA_BELOW_HU
        if inside.sum() < 500:
            continue
        residual = (image - ndimage.median_filter(image, 3))[inside]
        spreads.append(1.4826 * np.median(np.abs(residual - np.median(residual))))
    return round(float(np.median(spreads)), 1) if spreads else None


def noisy(noise_hu: float | None) -> bool:
    """Whether a lung noise reading (lung_noise_hu) is above what the model was checked at."""
    return noise_hu is not None and noise_hu > NOISE_WARN_HU


# Lung noise this many times below or above the healthy scans a site threshold was set on
# marks another kernel or dose: one scan read 4 HU with a standard kernel and 42 HU with a
# sharp one, while the healthy HRCT slices of one protocol spread over 19-49 HU.
SITE_NOISE_FACTOR = 2.0


def off_site_noise(noise_hu: float | None, site: dict | None) -> tuple[float, float] | None:
    """The lung noise range (HU) of the healthy scans a site threshold was set on (its record,
    `site_threshold.SiteThreshold.record`) when `noise_hu` lies well outside it, else None."""
    span = (site or {}).get("lung_noise_hu")
    if noise_hu is None or not span:
        return None
    low, high = span
    inside = low / SITE_NOISE_FACTOR <= noise_hu <= high * SITE_NOISE_FACTOR
    return None if inside else (low, high)


@dataclass(frozen=True)
class Column:
    key: str  # as report.json, summary.csv and the Slicer table name it
    title: str
    unit: str  # "" for none
    description: str


COLUMNS = (
    Column("region", "Region", "", "Whole lung, each lung, then each lobe or zone."),
    Column("volume_ml", "Volume", "mL", "Volume of the region."),
    Column("emphysema_index_percent", "Emphysema index", "%",
           "Share of the region's voxels in the emphysema label map."),
    Column("laa950_percent", "LAA-950", "%",
           "Share of the region's voxels at or below -950 HU (low attenuation area)."),
    Column("perc15_hu", "Perc15", "HU", "15th percentile of the region's densities."),
    Column("mean_anomaly", "Mean anomaly", "",
           "Mean anomaly probability of the network over the region, 0 to 1."),
    Column("stage", "Stage", "", "None, Mild, Moderate or Severe, from the emphysema index."),
    Column("coverage", "Coverage", "",
           "complete; partial (the region reaches the first or last slice: the scan cuts it "
           "off); or not in scan (a lobe of the lobe map with no voxel in the scanned lungs)."),
)
COMPLETE, PARTIAL, NOT_IN_SCAN = "complete", "partial", "not in scan"
COLUMN = {c.key: c for c in COLUMNS}
# the whole lung's columns in summary.csv, in its order (after the case and its anomaly score)
SUMMARY_KEYS = ("emphysema_index_percent", "laa950_percent", "perc15_hu", "volume_ml", "stage")
assert set(SUMMARY_KEYS) <= set(COLUMN)


@dataclass
class RegionMeasurements:
    """One region's row; `asdict` gives report.json's region entry, keys in this order."""

    region: str
    volume_ml: float
    emphysema_index_percent: float | None
    laa950_percent: float | None
    perc15_hu: float | None
    mean_anomaly: float | None
    stage: str | None = None
    stage_probabilities: dict[str, float] | None = None
    coverage: str = COMPLETE  # COMPLETE, PARTIAL or NOT_IN_SCAN

    @property
    def empty(self) -> bool:
        return self.emphysema_index_percent is None

    @property
    def partial(self) -> bool:
        return self.coverage == PARTIAL

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "RegionMeasurements":
        """A row of report.json (keys it does not know are ignored)."""
        values = {f.name: row.get(f.name) for f in fields(cls)}
        values["coverage"] = values["coverage"] or COMPLETE  # reports written before it
        return cls(**values)


LUNG_ROWS = 2  # right and left lung, after the whole lung


@dataclass
class Measurements:
    """A case's rows in `region_masks` order: whole lung, right lung, left lung, regions."""

    rows: list[RegionMeasurements]

    @property
    def whole(self) -> RegionMeasurements:
        return self.rows[0]

    @property
    def lungs(self) -> list[RegionMeasurements]:
        return self.rows[1:1 + LUNG_ROWS]

    @property
    def regions(self) -> list[RegionMeasurements]:
        return self.rows[1 + LUNG_ROWS:]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self.rows]

    @classmethod
    def from_dicts(cls, rows: list[dict]) -> "Measurements":
        return cls([RegionMeasurements.from_dict(r) for r in rows])


def region_masks(lungs: np.ndarray, regions: np.ndarray, legend: dict[int, str]):
    """(name, mask) for the whole lung, each lung, then each region of the legend."""
    yield "whole lung", lungs > 0  # then the LUNG_ROWS
    yield LUNG_NAMES[RIGHT], lungs == RIGHT
    yield LUNG_NAMES[LEFT], lungs == LEFT
    for value, name in sorted(legend.items()):
        yield name, regions == value


def measure(hu: np.ndarray, mask: np.ndarray, emphysema: np.ndarray, anomaly: np.ndarray,
            voxel_ml: float) -> dict:
    """The values of one region, keyed as COLUMNS (the fields of RegionMeasurements); an
    empty region reports its volume 0 and no values."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return {"volume_ml": 0.0, "emphysema_index_percent": None, "laa950_percent": None,
                "perc15_hu": None, "mean_anomaly": None}
    values = hu[mask]
    return {
        "volume_ml": round(n * voxel_ml, 2),
        "emphysema_index_percent": round(100.0 * np.count_nonzero(emphysema[mask]) / n, 4),
        "laa950_percent": laa_percent(values),
        "perc15_hu": perc15_hu(values),
        "mean_anomaly": round(float(anomaly[mask].mean()), 6),
    }
