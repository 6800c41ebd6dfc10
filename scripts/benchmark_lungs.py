#!/usr/bin/env python
"""Time the classical lung segmentation on the real CT (reading timed separately).

    taskset -c 0,1 python scripts/benchmark_lungs.py [--ct FOLDER_OR_FILE] [--repeat 3]

Prints the read time, the wall and CPU seconds of each segmentation run, the lung volumes and
the CPU count (scipy.ndimage runs on one thread; the count says what the machine offered).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from EmphysemaUADLib.lungs import LEFT, RIGHT, segment_lungs  # noqa: E402
from EmphysemaUADLib.volume_io import read_ct  # noqa: E402

DEFAULT_CT = ROOT.parent / "shared" / "data" / "chest-ct-dicom"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=str(DEFAULT_CT), help="CT file or DICOM folder")
    parser.add_argument("--repeat", type=int, default=3, help="segmentation runs (default 3)")
    args = parser.parse_args()
    if not Path(args.ct).exists():
        print(f"CT not found: {args.ct}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    ct = read_ct(args.ct)
    read_s = time.perf_counter() - start
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"machine: {platform.processor() or platform.machine()}, os.cpu_count() = "
          f"{os.cpu_count()}, usable by this process = {usable}")
    print(f"CT: {args.ct}  shape (z, y, x) {ct.shape}  spacing (x, y, z) mm "
          f"{tuple(round(s, 3) for s in ct.geometry.spacing)}")
    print(f"read: {read_s:.2f} s")
    walls = []
    for run in range(1, args.repeat + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        lungs = segment_lungs(ct)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        walls.append(wall)
        print(f"segment_lungs run {run}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    ml = ct.geometry.voxel_ml
    right, left = ((lungs == side).sum() * ml for side in (RIGHT, LEFT))
    print(f"best {min(walls):.2f} s, median {sorted(walls)[len(walls) // 2]:.2f} s")
    print(f"right lung {right:.0f} mL, left lung {left:.0f} mL, total {right + left:.0f} mL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
