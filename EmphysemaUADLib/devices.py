"""What a device choice (auto / cuda / cpu) will run on, in one line for a user: the GPU's
name and free memory, or the CPU, and why.

GPUs are read from `nvidia-smi`, which needs no CUDA context: asking PyTorch for free memory
(`torch.cuda.mem_get_info`) would create one in the calling process and hold some hundred MB
of GPU memory there for good (in Slicer: the application), memory the detection and training
worker processes then lack. PyTorch is only asked whether it sees CUDA at all (no context).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass

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
        return "CPU (chosen): detection takes minutes per CT, training is very slow."
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
    return "No CUDA GPU visible to PyTorch: runs on the CPU (minutes per CT)."
