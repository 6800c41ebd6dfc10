"""How the network runs fastest on the CPU: batch size and memory layout, in one process.

Usage: .venv/bin/python scripts/bench_cpu_network.py [CT] [--repeats N]
(CT default: the real thorax CT of ../shared/data/chest-ct-dicom). The lungs are segmented
once. Part 1 times the forward alone over the CT's lung-box slices at batch 8 and 1, with the
tensors in the default (contiguous) and channels-last layouts, each against batch 8
contiguous (the former default). Part 2 times detect_case (regions, noise, network,
measurements) as `detect` runs it (batch 1, channels-last) against batch 8, and checks that
the label maps are identical. Best of --repeats for each.
"""
import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.inference import lung_box, pad_to_multiple
from EmphysemaUADLib.intensity import hu_to_unit
from EmphysemaUADLib.lungs import segment_lungs
from EmphysemaUADLib.volume_io import read_ct

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("ct", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared"
                                                 / "data" / "chest-ct-dicom"))
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()
ct = read_ct(args.ct)
lungs = segment_lungs(ct)
detector = Detector.load(None, "cpu")
zs, ys, xs = lung_box(lungs)
slices = hu_to_unit(pad_to_multiple(ct.array[zs, ys, xs].astype(np.float32))[0])[:, None]


def best_of(run) -> float:
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def forward(batch: int, layout: torch.memory_format):
    model = copy.deepcopy(detector.model).to(memory_format=layout).eval()

    def run():
        with torch.inference_mode():
            for first in range(0, len(slices), batch):
                model(torch.from_numpy(slices[first:first + batch]).contiguous(
                    memory_format=layout))
    return run


print(f"{args.ct}: {len(slices)} lung-box slices of {slices.shape[2]} x {slices.shape[3]}, "
      f"best of {args.repeats}")
timed = {(b, name): best_of(forward(b, layout)) for b in (8, 1)
         for name, layout in (("contiguous", torch.contiguous_format),
                              ("channels-last", torch.channels_last))}
for (batch, name), seconds in timed.items():
    print(f"forward, batch {batch}, {name:13s} {seconds:6.1f} s  "
          f"x{timed[8, 'contiguous'] / seconds:.2f}")
seconds, maps = {}, {}
for batch in (8, detector.batch_size):
    run = dataclasses.replace(detector, batch_size=batch)

    def detect():
        maps[batch] = detect_case(ct, run, lungs=lungs, warn=False).emphysema
    seconds[batch] = best_of(detect)
same = np.array_equal(maps[8], maps[detector.batch_size])
print(f"detect_case, batch 8: {seconds[8]:.1f} s; as detect runs it (batch "
      f"{detector.batch_size}): {seconds[detector.batch_size]:.1f} s, "
      f"x{seconds[8] / seconds[detector.batch_size]:.2f}; label maps "
      f"{'identical' if same else 'DIFFER'}")
