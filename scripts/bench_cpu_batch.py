"""CPU detection time by network batch size, each against batch 8 in the same process.

Usage: .venv/bin/python scripts/bench_cpu_batch.py [CT] [--repeats N]
(CT default: the real thorax CT of ../shared/data/chest-ct-dicom). The lungs are segmented
once; each repeat times detect_case (regions, noise, network, measurements) at batch 8, 4, 2
and 1 in turn, and the best time of each is compared. The label maps must not change.
"""
import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.lungs import segment_lungs
from EmphysemaUADLib.volume_io import read_ct

SIZES = (8, 4, 2, 1)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("ct", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared"
                                                 / "data" / "chest-ct-dicom"))
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()
ct = read_ct(args.ct)
lungs = segment_lungs(ct)
detector = Detector.load(None, "cpu")
best, labels = {}, {}
for _ in range(args.repeats):
    for size in SIZES:
        start = time.perf_counter()
        result = detect_case(ct, dataclasses.replace(detector, batch_size=size), lungs=lungs,
                             warn=False)
        best[size] = min(best.get(size, np.inf), time.perf_counter() - start)
        labels.setdefault(size, result.emphysema)
print(f"{args.ct}: {ct.shape[0]} slices, best of {args.repeats}")
for size in SIZES:
    same = np.array_equal(labels[size], labels[8])
    print(f"batch {size}: {best[size]:6.1f} s  x{best[8] / best[size]:.2f} vs batch 8"
          f"  label map {'identical' if same else 'DIFFERS'}")
