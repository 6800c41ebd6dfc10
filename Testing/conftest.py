"""Shared test helpers: where the real CT data lives, and a skip for when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The CI machine has 2 cores; more threads only add contention there.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

requires_shared = pytest.mark.skipif(
    not (SHARED_DATA / "chest-ct-dicom").is_dir(),
    reason=f"real CT data not found at {SHARED_DATA} (the ../shared folder beside the checkout)")
