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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: they gain nothing from threads, and on a busy machine
    the threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
