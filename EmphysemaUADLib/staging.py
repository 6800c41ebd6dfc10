"""Stages from the emphysema index (% of a region's voxels in the emphysema label map).

Default cut-points, no labels involved: None below 1 % (healthy lungs show up to about 1 %
from noise and partial volume; Fleischner's "trace" is < 0.5 %), Mild 1-5 % (Fleischner
mild: 0.5-5 %), Moderate 5-25 % (Fleischner moderate: > 5 %), Severe from 25 %
(confluent or advanced destructive disease; the commonest quantitative-CT cut for severe
emphysema, %LAA-950 >= 25 %).
"""
from __future__ import annotations

import numpy as np

STAGES = ("None", "Mild", "Moderate", "Severe")
DEFAULT_CUTPOINTS = (1.0, 5.0, 25.0)


def stage_index(index_percent: float, cutpoints=DEFAULT_CUTPOINTS) -> int:
    return int(np.searchsorted(np.asarray(cutpoints, dtype=float), index_percent, side="right"))


def stage_of(index_percent: float, cutpoints=DEFAULT_CUTPOINTS) -> str:
    return STAGES[stage_index(index_percent, cutpoints)]
