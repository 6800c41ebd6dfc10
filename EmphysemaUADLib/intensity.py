"""The network's intensity window: HU clipped to [-1000, 400] and scaled to [0, 1]."""
from __future__ import annotations

import numpy as np

HU_WINDOW = (-1000.0, 400.0)


def hu_to_unit(hu, window=HU_WINDOW):
    lo, hi = window
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
