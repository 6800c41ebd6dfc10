"""How the network runs fastest on the CPU: batch size, memory layout and precision, in one
process.

Usage: .venv/bin/python scripts/bench_cpu_network.py [CT] [--repeats N]
(CT default: the real thorax CT of ../shared/data/chest-ct-dicom). The lungs are segmented
once. Part 1 times the forward alone over the CT's lung-box slices at batch 8 and 1, with the
tensors in the default (contiguous) and channels-last layouts, in float32 and (where the CPU
has native bfloat16) in bfloat16, each against batch 8 contiguous float32 (the first
default). Part 2 times detect_case (regions, noise, network, measurements) as `detect` runs it
(batch 1, channels-last, bfloat16 where native) against float32 (EMPHYSEMA_UAD_FLOAT32=1),
and compares their maps. Best of --repeats for each.
"""
import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from EmphysemaUADLib.detection import Detector, detect_case
from EmphysemaUADLib.inference import (FLOAT32_ENV, lung_box, pad_to_multiple, precision,
                                       use_bfloat16)
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
native_bf16 = use_bfloat16(torch.device("cpu"))


def best_of(run) -> float:
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def forward(batch: int, layout: torch.memory_format, bf16: bool):
    model = copy.deepcopy(detector.model).to(memory_format=layout).eval()

    def run():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for first in range(0, len(slices), batch):
                model(torch.from_numpy(slices[first:first + batch]).contiguous(
                    memory_format=layout))
    return run


print(f"{args.ct}: {len(slices)} lung-box slices of {slices.shape[2]} x {slices.shape[3]}, "
      f"best of {args.repeats}; native bfloat16: {'yes' if native_bf16 else 'no'}")
timed = {(b, name, kind): best_of(forward(b, layout, kind == "bfloat16"))
         for kind in ("float32", "bfloat16")[:1 + native_bf16] for b in (8, 1)
         for name, layout in (("contiguous", torch.contiguous_format),
                              ("channels-last", torch.channels_last))}
baseline = timed[8, "contiguous", "float32"]
for (batch, name, kind), seconds in timed.items():
    print(f"forward, batch {batch}, {name:13s} {kind:8s} {seconds:6.1f} s  "
          f"x{baseline / seconds:.2f}")


def detect(float32: bool):
    """detect_case's seconds and result, float32 forced or as `detect` runs."""
    os.environ[FLOAT32_ENV] = "1" if float32 else "0"
    out = {}

    def run():
        out["result"] = detect_case(ct, detector, lungs=lungs, warn=False)
    seconds = best_of(run)
    return seconds, out["result"], precision(detector.device)


(f32_s, f32, _), (run_s, ran, kind) = detect(True), detect(False)
os.environ.pop(FLOAT32_ENV)
lung = lungs > 0
differ = int((f32.emphysema != ran.emphysema).sum())
print(f"detect_case, float32: {f32_s:.1f} s; as detect runs it (batch {detector.batch_size}, "
      f"{kind}): {run_s:.1f} s, x{f32_s / run_s:.2f}")
print(f"maps: largest probability difference {np.abs(f32.anomaly - ran.anomaly).max():.4f}; "
      f"{differ} of {int(lung.sum())} lung voxels labelled differently; emphysema index "
      f"{f32.measurements.whole.emphysema_index_percent:.3f} % (float32) against "
      f"{ran.measurements.whole.emphysema_index_percent:.3f} %")
