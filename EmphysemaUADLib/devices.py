"""Devices: the choices (auto / cuda / cpu), the torch device a choice gives
(`choose_device`), what it will run on in one line for a user (`describe`: the GPU's name and
free memory, or the CPU, and why), and the machine a result was measured on (`machine_info`).

GPUs are read from `nvidia-smi`, which needs no CUDA context: asking PyTorch for free memory
(`torch.cuda.mem_get_info`) would create one in the calling process and hold some hundred MB
of GPU memory there for good (in Slicer: the application), memory the detection and training
worker processes then lack. PyTorch is only asked whether it sees CUDA at all (no context).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, setting_error

DEVICE_CHOICES = ("auto", "cuda", "cpu")

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.free,memory.total",
                    "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_mib: float
    total_mib: float

    def describe(self) -> str:
        return (f"GPU {self.index}: {self.name}, {self.free_mib / 1024:.1f} of "
                f"{self.total_mib / 1024:.1f} GiB free")


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.free,memory.total
    --format=csv,noheader,nounits` output; lines that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        # a GPU name may itself hold commas: index first, the two numbers last
        index, free, total = parts[0], parts[-2], parts[-1]
        name = ", ".join(parts[1:-2])
        try:
            gpus.append(Gpu(int(index), name, float(free), float(total)))
        except ValueError:
            continue
    return gpus


def nvidia_gpus(timeout_s: float = 5.0) -> list[Gpu] | None:
    """NVIDIA GPUs with their free memory now; None when nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    try:
        done = subprocess.run([exe, *NVIDIA_SMI_QUERY], capture_output=True, text=True,
                              timeout=timeout_s, check=False, creationflags=flags)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_nvidia_smi(done.stdout)


def torch_sees_cuda() -> bool | None:
    """True/False: whether PyTorch can use CUDA; None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return bool(torch.cuda.is_available())


def describe(device: str = "auto", gpus: list[Gpu] | None = None,
             cuda: bool | None = None) -> str:
    """One line saying what `device` will run on. `gpus` (from `nvidia_gpus()`) and `cuda`
    (from `torch_sees_cuda()`) are looked up when not given."""
    if device == "cpu":
        return ("CPU (chosen): detection takes up to about a minute per CT, fine-tuning "
                "minutes, training from scratch very long.")
    cuda = torch_sees_cuda() if cuda is None else cuda
    gpus = nvidia_gpus() if gpus is None else gpus
    if cuda is None:
        return "PyTorch is not installed yet; it is offered when you first run."
    if cuda:
        if gpus:
            extra = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
            return f"{gpus[0].describe()}{extra}."
        return "CUDA GPU (name and free memory unknown: nvidia-smi not found)."
    if gpus:
        return (f"{gpus[0].describe()}, but the installed PyTorch cannot use it (a CPU build, "
                "or a CUDA build too new for the driver): runs on the CPU. Reinstall PyTorch "
                "with the PyTorch Utils module.")
    if device == "cuda":
        return "No CUDA GPU visible to PyTorch: 'cuda' will fail; choose auto or cpu."
    return ("No CUDA GPU visible to PyTorch: runs on the CPU (up to about a minute per "
            "CT).")


def choose_device(name: str = "auto"):
    """The torch device of a choice in DEVICE_CHOICES; InputError for cuda without one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but PyTorch sees no CUDA GPU here (is a "
                         "CUDA build of torch installed?); choose the device cpu or auto.",
                         "device")
    if name not in DEVICE_CHOICES:
        raise setting_error("device", f"{name!r} is unknown; use auto, cpu or cuda.")
    return torch.device(name)


def machine_info() -> dict:
    """CPU, usable cores, GPU and library versions: the machine a result was measured on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the model; platform gives only x86_64
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"summary": f"{cpu}, {cpus} CPU cores usable" + (f", GPU {gpu}" if gpu else
                                                             ", no GPU"),
            "cpu": cpu, "cpus_usable": cpus, "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
