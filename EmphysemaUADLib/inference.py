"""The network over a CT: lung-box slices in batches, back into the CT's own grid.

`predict_ct` shows the network what it learnt from, whatever grid a CT is stored on: axial
slices (a coronally stored series is turned) at a pixel size within PIXEL_RANGE_MM (finer or
coarser grids are resampled in-plane), and brings the map back to the CT's grid.
`predict_anomaly` runs the network over the slices of an array as they are: cropped to the
lungs' in-plane bounding box (padded with air to a multiple of 16, as the U-Net needs),
streamed through the network a batch at a time, and the anomaly probabilities written
straight into a map of the array's shape: memory on the device is bounded by the batch,
whatever the number of slices.

The voxel score is the anomaly head's probability, or, for a reconstruction-only model (the
baseline of the reconstruction-based detectors, trained without the anomaly term), the
residual |input - reconstruction| in the network's [0, 1] intensity units (1 = 1400 HU).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .intensity import hu_to_unit
from .progress import NO_PROGRESS, Progress
from .regions import superior_axis
from .roi import is_roi
from .volume_io import Volume

MULTIPLE = 16  # four 2x down-steps
BOX_MARGIN = 8  # voxels of context around the lungs
SCORES = ("anomaly", "residual")
# In-plane pixel sizes (mm) the network is run at. The real CTs the bundled model learnt from
# and was checked on have 0.78-0.98 mm pixels; at its own 1.56 mm grid (a real slice binned
# 2 x 2) severe emphysema went unseen, and resampled back to 1.0 mm it was found again.
PIXEL_RANGE_MM = (0.7, 1.0)
FLOAT32_ENV = "EMPHYSEMA_UAD_FLOAT32"


def lung_box(lungs: np.ndarray, margin: int = BOX_MARGIN) -> tuple[slice, slice, slice] | None:
    """(z, y, x) slices of the lungs' bounding box, in-plane margin included; None if empty."""
    nonzero = [np.flatnonzero(lungs.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if any(len(n) == 0 for n in nonzero):
        return None
    z, y, x = nonzero
    return (slice(z[0], z[-1] + 1),
            slice(max(y[0] - margin, 0), min(y[-1] + 1 + margin, lungs.shape[1])),
            slice(max(x[0] - margin, 0), min(x[-1] + 1 + margin, lungs.shape[2])))


def pad_to_multiple(batch_hu: np.ndarray, mirror: bool = False
                    ) -> tuple[np.ndarray, int, int]:
    """Slices (n, h, w) padded to multiples of 16, with air or (`mirror`) with their own
    mirror image; also the top and left pads."""
    n, h, w = batch_hu.shape
    ph, pw = -h % MULTIPLE, -w % MULTIPLE
    if ph or pw:
        pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        batch_hu = (np.pad(batch_hu, pads, mode="symmetric") if mirror else
                    np.pad(batch_hu, pads, constant_values=-1000.0))
    return batch_hu, ph // 2, pw // 2


def network_input(batch_hu: np.ndarray, device: torch.device) -> torch.Tensor:
    """A padded batch of slices (n, H, W) in HU as the network takes it: (n, 1, H, W) in
    [0, 1] units, channels-last (faster convolutions on GPUs and on the CPU alike)."""
    return torch.from_numpy(hu_to_unit(batch_hu)[:, None]).to(device).contiguous(
        memory_format=torch.channels_last)


def use_bfloat16(device: torch.device) -> bool:
    """Whether the network runs (inference and training) in bfloat16 on `device`: on GPUs,
    and on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX), where it is about three
    times faster than float32 (inference 0.03 against 0.10 s a slice, a training step of 8
    patches 0.6 against 1.9 s, on 2 Xeon cores) and moves probabilities by a few hundredths
    at most (the real thorax CT: 0.022; 51 of its 2.8 million lung voxels change label).
    Elsewhere bfloat16 is emulated and slower, so float32. FLOAT32_ENV=1 asks for float32
    everywhere (the same maps on every machine, bit for bit, at the CPU's float32 speed)."""
    if os.environ.get(FLOAT32_ENV, "") not in ("", "0") or device.type not in ("cuda", "cpu"):
        return False
    if device.type == "cuda":
        return True
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported and torch.backends.mkldnn.is_available() and supported())


def precision(device: torch.device) -> str:
    """The network's arithmetic on `device`, as reports name it."""
    return "bfloat16" if use_bfloat16(device) else "float32"


def score_batch(model, x: torch.Tensor, score: str = "anomaly") -> torch.Tensor:
    """Voxel scores (float32, like x) of a batch x (n, 1, H, W) in [0, 1] units."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16,
                        enabled=use_bfloat16(x.device)):
        recon, logit = model(x)
    if score == "residual":
        return (x.float() - recon.float()).abs()
    return torch.sigmoid(logit.float())


def predict_anomaly(hu: np.ndarray, lungs: np.ndarray, model: torch.nn.Module,
                    device: torch.device, batch_size: int = 8,
                    progress: Progress = NO_PROGRESS,
                    score: str = "anomaly", roi: bool = False) -> np.ndarray:
    """Voxel scores (float32, CT shape; see SCORES); zero outside the lungs. With `roi` (an
    ROI of parenchyma, roi.py) the network sees whole slices mirrored at their edges instead
    of the lungs' box framed by air."""
    if score not in SCORES:
        raise InputError(f"unknown voxel score {score!r} in the model config; this version "
                         f"knows {', '.join(SCORES)}.")
    anomaly = np.zeros(hu.shape, np.float32)
    box = lung_box(lungs, margin=max(hu.shape) if roi else BOX_MARGIN)
    if box is None:
        return anomaly
    zs, ys, xs = box
    model = model.to(device, memory_format=torch.channels_last).eval()  # as network_input
    total = zs.stop - zs.start
    done = 0
    with torch.inference_mode():
        while done < total:
            chunk = slice(zs.start + done, min(zs.start + done + batch_size, zs.stop))
            batch, top, left = pad_to_multiple(hu[chunk, ys, xs].astype(np.float32), roi)
            x = network_input(batch, device)
            try:
                prob = score_batch(model, x, score)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                batch_size //= 2
                progress.log(f"out of GPU memory; batch size halved to {batch_size}",
                             level="warning")
                continue
            h, w = ys.stop - ys.start, xs.stop - xs.start
            anomaly[chunk, ys, xs] = prob[:, 0, top:top + h, left:left + w].cpu().numpy()
            done = chunk.stop - zs.start
            progress.step(done, total, stage="network")
    anomaly[lungs == 0] = 0.0
    return anomaly


def _zoom_factors(spacing_yx) -> tuple[float, float]:
    """Zoom factors that bring each in-plane pixel size into PIXEL_RANGE_MM."""
    return tuple(float(s) / float(np.clip(s, *PIXEL_RANGE_MM)) for s in spacing_yx)


def _zoom_in_plane(volume: np.ndarray, factors, order: int = 1) -> np.ndarray:
    """`volume` (z, y, x) zoomed in-plane; shrinking is anti-aliased first."""
    volume = volume.astype(np.float32)
    sigma = [0.0] + [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
    if any(sigma):
        volume = ndimage.gaussian_filter(volume, sigma)
    return ndimage.zoom(volume, (1.0, *factors), order=order)


def predict_ct(ct: Volume, lungs: np.ndarray, model: torch.nn.Module, device: torch.device,
               batch_size: int = 8, progress: Progress = NO_PROGRESS,
               score: str = "anomaly") -> np.ndarray:
    """Voxel scores on the CT's grid (float32; zero outside the lungs), the network seeing
    axial slices at a pixel size within PIXEL_RANGE_MM (an ROI's lung labels, roi.py: whole
    slices mirrored at their edges, see predict_anomaly)."""
    axis, _ = superior_axis(ct.geometry)
    order = (axis, *[a for a in range(3) if a != axis])
    hu, mask = np.transpose(ct.array, order), np.transpose(lungs > 0, order)
    factors = _zoom_factors([ct.geometry.spacing_zyx[a] for a in order[1:]])
    resampled = any(abs(f - 1.0) > 1e-3 for f in factors)
    if resampled:
        hu = _zoom_in_plane(hu, factors)
        mask = _zoom_in_plane(mask, factors) > 0.5
    scores = predict_anomaly(hu, mask, model, device, batch_size, progress, score,
                             is_roi(lungs))
    if resampled:  # back to the CT's in-plane grid, exactly its shape
        target = np.transpose(lungs, order).shape
        scores = ndimage.zoom(scores, (1.0, target[1] / scores.shape[1],
                                       target[2] / scores.shape[2]), order=1)
    scores = np.ascontiguousarray(np.transpose(scores, np.argsort(order)), dtype=np.float32)
    scores[lungs == 0] = 0.0
    return scores
