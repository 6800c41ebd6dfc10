"""`emphysema-uad benchmark`: how fast detection runs, step by step, and what it costs in memory.

Input: the real CT of ../shared/data/chest-ct-dicom beside the checkout (or --ct), else a
phantom of the default size. In one run:
- on the CPU: detect end to end (read, lungs, regions, network, measurements, writing the
  outputs), each step timed;
- on a GPU, where PyTorch sees one: the same (after a warm-up run), then the pure network
  forward of the same lung-box slices (already on the GPU, same batches, synchronised) and
  the ratios end-to-end / forward and network step / forward (target <= 1.5); throughput of
  a width-64 EDLNet at 384 x 384 in bf16, inference (slices/s, batch 32) and training steps
  (slices/s, batch 32), each with its peak GPU memory.
Peak RAM is the process's high-water mark (ru_maxrss), read after each part.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .detection import Detector, detect_case
from .devices import machine_info
from .inference import lung_box, network_input, pad_to_multiple, precision, use_bfloat16
from .progress import NO_PROGRESS, Progress
from .volume_io import read_ct

DEFAULT_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct-dicom"
THROUGHPUT = {"width": 64, "size": 384, "batch": 32}
WARMUP_STEPS, TIMED_STEPS = 3, 10


def peak_ram_mb() -> float | None:
    """The process's high-water mark of resident memory; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return round(peak / (1024.0 ** 2 if sys.platform == "darwin" else 1024.0), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_input(ct_path=None, progress: Progress = NO_PROGRESS):
    """(Volume, seconds to read it, description): --ct, the shared real CT, or a phantom."""
    path = Path(ct_path) if ct_path else DEFAULT_CT
    if ct_path or path.exists():
        start = time.perf_counter()
        ct = read_ct(path)
        return ct, round(time.perf_counter() - start, 3), f"{path} {ct.shape}"
    from .phantom import make_phantom

    progress.log(f"{path} not found; timing a phantom instead")
    ct = make_phantom(0).ct
    return ct, 0.0, f"phantom seed 0 {ct.shape} (the real CT {path} was not found)"


def time_detection(ct, detector: Detector) -> dict:
    """One detection end to end, by step; writing the outputs included (to a temp folder)."""
    from .report import write_case

    _sync(detector.device)
    start = time.perf_counter()
    result = detect_case(ct, detector)
    _sync(detector.device)
    with tempfile.TemporaryDirectory() as folder:
        written = time.perf_counter()
        write_case(result, detector, "benchmark", Path(folder))
        steps = {**result.timings, "write": round(time.perf_counter() - written, 3)}
    steps["total"] = round(time.perf_counter() - start, 3)
    box = lung_box(result.lungs)
    return {"steps_s": steps, "slices": 0 if box is None else int(box[0].stop - box[0].start),
            "lungs": result.lungs}


def forward_time(ct, lungs, detector: Detector) -> float:
    """Seconds of the network forward alone over detection's lung-box slices: the batches
    are prepared and moved to the device first, so only the model's work is timed."""
    box = lung_box(lungs)
    zs, ys, xs = box
    device, size = detector.device, detector.batch_size
    batches = []
    for first in range(zs.start, zs.stop, size):
        padded, _, _ = pad_to_multiple(ct.array[first:min(first + size, zs.stop), ys, xs]
                                       .astype(np.float32))
        batches.append(network_input(padded, device))
    model = detector.model
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=use_bfloat16(device)):
        model(batches[0])  # warm-up
        _sync(device)
        start = time.perf_counter()
        for x in batches:
            model(x)
        _sync(device)
    return time.perf_counter() - start


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    """Peak device memory since the last reset; None off CUDA (RAM is read separately)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def network_throughput(device: torch.device, width: int = THROUGHPUT["width"],
                       size: int = THROUGHPUT["size"], batch: int = THROUGHPUT["batch"]) -> dict:
    """Slices/s of a fresh EDLNet in the precision and layout detection and training use on
    `device`: inference and training steps."""
    from .network import EDLNet
    from .training import channels_last, train_step

    model = EDLNet(width=width).to(device)
    x = torch.rand(batch, 1, size, size, device=device)
    if channels_last(device):
        model, x = (t.to(memory_format=torch.channels_last) for t in (model, x))
    out = {"width": width, "size": size, "batch": batch}
    _reset_peak(device)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=use_bfloat16(device)):
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            if step == WARMUP_STEPS:
                _sync(device)
                start = time.perf_counter()
            model(x)
    _sync(device)
    out["inference_slices_per_s"] = round(batch * TIMED_STEPS / (time.perf_counter() - start), 1)
    out["inference_peak_gpu_mb"] = _peak_mb(device)
    _reset_peak(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = (x, x, (x > 0.5).float())
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            _sync(device)
            start = time.perf_counter()
        train_step(model, optimizer, data, device, 1e-4)
    _sync(device)
    out["training_slices_per_s"] = round(batch * TIMED_STEPS / (time.perf_counter() - start), 1)
    out["training_peak_gpu_mb"] = _peak_mb(device)
    return out


def accelerated_run(ct, model, device: str, batch_size: int | None, throughput: dict = THROUGHPUT,
                    progress: Progress = NO_PROGRESS) -> dict:
    """The GPU part: detection after a warm-up run, the forward alone over the same slices and
    their ratios, then the throughput. Runs on any device, so CI exercises it on the CPU."""
    detector = Detector.load(model, device, batch_size=batch_size)
    progress.log(f"{device} detection (after a warm-up run), forward alone, throughput")
    time_detection(ct, detector)  # warm-up: CUDA context, kernels, allocator
    device = detector.device
    _reset_peak(device)
    run = time_detection(ct, detector)
    peak = _peak_mb(device)
    forward = forward_time(ct, run["lungs"], detector)
    steps = run["steps_s"]
    return {"steps_s": steps, "slices": run["slices"], "forward_s": round(forward, 4),
            "end_to_end_over_forward": round(steps["total"] / forward, 2),
            "network_step_over_forward": round(steps["network"] / forward, 2),
            "peak_gpu_mb": peak, "precision": precision(device),
            "throughput": network_throughput(device, **throughput),
            "peak_ram_mb": peak_ram_mb()}


def run_benchmark(model=None, ct_path=None, batch_size: int | None = None,
                  progress: Progress = NO_PROGRESS) -> dict:
    ct, read_s, source = load_input(ct_path, progress)
    results = {"input": source, "machine": machine_info(), "read_s": read_s}
    cpu = Detector.load(model, "cpu", batch_size=batch_size)
    results["model"] = {"path": cpu.model_path, "config": cpu.config["model"]}
    progress.log(f"CPU detection of {source}")
    run = time_detection(ct, cpu)
    results["cpu"] = {"steps_s": run["steps_s"], "slices": run["slices"],
                      "slices_per_s_network": round(run["slices"] / run["steps_s"]["network"], 2),
                      "precision": precision(cpu.device), "peak_ram_mb": peak_ram_mb()}
    if torch.cuda.is_available():
        results["gpu"] = accelerated_run(ct, model, "cuda", batch_size, progress=progress)
    return results


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def markdown(results: dict) -> str:
    cpu, gpu = results["cpu"], results.get("gpu")
    config = results["model"]["config"]
    lines = ["# EmphysemaUAD speed", "",
             f"Input: {results['input']}; read {results['read_s']:.2f} s. Model: "
             f"{Path(results['model']['path']).name} (width {config['width']}). Machine: "
             f"{results['machine']['summary']}.", "",
             "| step (s) | CPU |" + (" GPU |" if gpu else ""),
             "|---|---|" + ("---|" if gpu else "")]
    for step in cpu["steps_s"]:
        lines.append(f"| {step} | {cpu['steps_s'][step]:.2f} |" +
                     (f" {gpu['steps_s'][step]:.3f} |" if gpu else ""))
    ram = [_mb(r["peak_ram_mb"]) for r in (cpu, gpu) if r]
    lines.append("| peak RAM (MB, process) | " + " | ".join(ram) + " |")
    lines += ["", f"{cpu['slices']} lung slices; CPU network {cpu['slices_per_s_network']} "
              f"slices/s in {cpu['precision']}."]
    if gpu:
        t = gpu["throughput"]
        lines += [f"GPU: network forward alone {gpu['forward_s']:.3f} s; end-to-end / forward "
                  f"{gpu['end_to_end_over_forward']}, network step / forward "
                  f"{gpu['network_step_over_forward']} (target <= 1.5); peak GPU memory in "
                  f"detection {_mb(gpu['peak_gpu_mb'])} MB.",
                  f"Width {t['width']} at {t['size']} x {t['size']}, bf16, batch {t['batch']}: "
                  f"inference {t['inference_slices_per_s']} slices/s (peak "
                  f"{_mb(t['inference_peak_gpu_mb'])} MB), training "
                  f"{t['training_slices_per_s']} slices/s (peak "
                  f"{_mb(t['training_peak_gpu_mb'])} MB)."]
    else:
        lines.append("GPU part skipped: PyTorch sees no CUDA GPU on this machine.")
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path) -> Path:
    """benchmark.png: seconds per detection step (CPU, and GPU where timed)."""
    from .plots import bars, new_figure, save_figure

    runs = [("CPU", results["cpu"])] + ([("GPU", results["gpu"])] if results.get("gpu") else [])
    fig, axes = new_figure(6.5 * len(runs), 4.5, panels=len(runs))
    for ax, (name, run) in zip(axes, runs):
        steps = run["steps_s"]
        bars(ax, list(steps), [float(v) for v in steps.values()],
             f"Detection time by step, {name}", "seconds")
    fig.suptitle(f"{Path(results['model']['path']).name} on {results['input']}", fontsize=9)
    return save_figure(fig, path)
