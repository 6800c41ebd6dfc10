"""Clinical measurements of each region: volume, emphysema index, LAA%-950, Perc15, score."""
from __future__ import annotations

import numpy as np

from .regions import LEFT, RIGHT

LAA_THRESHOLD_HU = -950.0


def region_masks(lungs: np.ndarray, regions: np.ndarray, legend: dict[int, str]):
    """(name, mask) for the whole lung, each lung, then each region of the legend."""
    yield "whole lung", lungs > 0
    yield "right lung", lungs == RIGHT
    yield "left lung", lungs == LEFT
    for value, name in sorted(legend.items()):
        yield name, regions == value


def measure(hu: np.ndarray, mask: np.ndarray, emphysema: np.ndarray, anomaly: np.ndarray,
            voxel_ml: float) -> dict:
    """Measurements of one region; an empty region reports its volume 0 and no values."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return {"volume_ml": 0.0, "emphysema_index_percent": None, "laa950_percent": None,
                "perc15_hu": None, "mean_anomaly": None}
    values = hu[mask]
    return {
        "volume_ml": round(n * voxel_ml, 2),
        "emphysema_index_percent": round(100.0 * np.count_nonzero(emphysema[mask]) / n, 4),
        "laa950_percent": round(100.0 * np.count_nonzero(values <= LAA_THRESHOLD_HU) / n, 4),
        "perc15_hu": round(float(np.percentile(values, 15)), 2),
        "mean_anomaly": round(float(anomaly[mask].mean()), 6),
    }
