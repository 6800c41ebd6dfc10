"""Per-region measurements against values counted by hand."""
from __future__ import annotations

import numpy as np

from EmphysemaUADLib.measurements import measure, region_masks


def test_measure_counts_by_hand():
    hu = np.array([[[-1000, -960, -950, -949, -900, -850, -800, -700, -600, 0]]], np.float32)
    mask = np.ones_like(hu, bool)
    mask[0, 0, 9] = False  # the 0 HU voxel is outside the region
    label = np.zeros(hu.shape, np.uint8)
    label[0, 0, :2] = 1
    anomaly = np.linspace(0, 0.9, 10, dtype=np.float32).reshape(hu.shape)
    m = measure(hu, mask, label, anomaly, voxel_ml=0.5)
    assert m["volume_ml"] == 4.5
    assert m["emphysema_index_percent"] == round(200 / 9, 4)
    assert m["laa950_percent"] == round(300 / 9, 4)   # -1000, -960, -950 (<= -950)
    assert m["perc15_hu"] == round(float(np.percentile(hu[mask], 15)), 2)
    assert m["mean_anomaly"] == round(float(anomaly[mask].mean()), 6)


def test_empty_region_has_no_values():
    m = measure(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)),
                np.zeros((1, 2, 2)), 1.0)
    assert m["volume_ml"] == 0 and m["emphysema_index_percent"] is None


def test_region_masks_order():
    lungs = np.array([[[1, 1, 2, 0]]])
    regions = np.array([[[4, 0, 5, 0]]])
    names = [n for n, _ in region_masks(lungs, regions, {5: "b", 4: "a"})]
    assert names == ["whole lung", "right lung", "left lung", "a", "b"]
