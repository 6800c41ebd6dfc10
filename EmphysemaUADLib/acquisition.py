"""CT acquisition simulation: reconstruction-kernel resolution and correlated image noise.

Works on a 2-D slice (y, x) or a 3-D volume (z, y, x), `spacing` in mm in the same axis order.
Kernel and noise act in-plane only: filtered back-projection works slice by slice, and the
slice profile along z is already part of the image.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft
from scipy import ndimage

from .errors import InputError

KERNELS = ("smooth", "sharp")
# Image noise SD in a uniform region, standard dose to low dose (chest CT in lung tissue is
# typically ~10-20 HU at standard dose; low-dose screening 30-50 HU and more).
NOISE_LEVELS = (10.0, 20.0, 35.0, 50.0)

# Resolution. Soft-tissue kernels (e.g. B30f/FC13/"C") have a point spread of ~1.2-1.6 mm FWHM
# => Gaussian sigma ~0.6 mm. Lung/bone kernels (B60f/B70f, FC51/"L") are sharper and enhance
# edges with a small overshoot: a slight blur followed by unsharp masking.
SMOOTH_SIGMA_MM = 0.6
SHARP_SIGMA_MM = 0.3
SHARP_UNSHARP_SIGMA_MM = 1.0
SHARP_UNSHARP_AMOUNT = 0.6

# Noise power spectrum of FBP: NPS(f) ~ |f| (ramp filter, 2-D) x apodisation(f)^2. With a
# Gaussian apodisation exp(-(f/fc)^2) the NPS peaks at fc/2: ~0.55 cycles/mm for lung kernels
# (fine grain), ~0.2 cycles/mm for soft-tissue kernels (coarse blotches, ~2.5 mm) as measured
# on clinical scanners (peaks 0.1-0.3 vs 0.4-0.8 cycles/mm).
NPS_CUTOFF = {"smooth": 0.4, "sharp": 1.1}  # fc in cycles/mm


def check_image(hu, spacing) -> tuple[np.ndarray, np.ndarray]:
    """The image as float32 and its spacing as an array; InputError when they do not fit."""
    image = np.asarray(hu, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise InputError(f"Expected a 2-D slice or a 3-D volume, got an array with "
                         f"{image.ndim} dimension(s).")
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.size != image.ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"The spacing must be {image.ndim} positive numbers in mm (one per "
                         f"axis, in array order), got {tuple(spacing.tolist())}.")
    return image, spacing


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise InputError(f"Unknown reconstruction kernel '{kernel}'; use one of {KERNELS}.")


def _in_plane_sigma(spacing: np.ndarray, sigma_mm: float) -> list[float]:
    sigma = [0.0] * spacing.size
    sigma[-2:] = (sigma_mm / spacing[-2:]).tolist()
    return sigma


def apply_kernel(hu, spacing, kernel: str) -> np.ndarray:
    """The image as reconstructed with a smooth (soft-tissue) or sharp (lung) kernel.

    Both keep the mean ('reflect' borders make the blur doubly stochastic)."""
    image, spacing = check_image(hu, spacing)
    _check_kernel(kernel)
    if kernel == "smooth":
        return ndimage.gaussian_filter(image, _in_plane_sigma(spacing, SMOOTH_SIGMA_MM),
                                       mode="reflect")
    base = ndimage.gaussian_filter(image, _in_plane_sigma(spacing, SHARP_SIGMA_MM),
                                   mode="reflect")
    wide = ndimage.gaussian_filter(base, _in_plane_sigma(spacing, SHARP_UNSHARP_SIGMA_MM),
                                   mode="reflect")
    return (base + SHARP_UNSHARP_AMOUNT * (base - wide)).astype(np.float32)


@lru_cache(maxsize=16)
def _noise_filter(ny: int, nx: int, sy: float, sx: float, kernel: str) -> np.ndarray:
    """Amplitude filter (rfft2 layout) whose output has unit variance for unit white input."""
    fy = np.fft.fftfreq(ny, d=sy)[:, None]
    fx = np.fft.rfftfreq(nx, d=sx)[None, :]
    f = np.hypot(fy, fx)
    amplitude = np.sqrt(f) * np.exp(-(f / NPS_CUTOFF[kernel]) ** 2)
    # Parseval over the full (Hermitian) spectrum: variance = mean |H|^2 over all ny*nx bins.
    weight = np.full(nx // 2 + 1, 2.0)
    weight[0] = 1.0
    if nx % 2 == 0:
        weight[-1] = 1.0
    power = float((amplitude ** 2 * weight[None, :]).sum()) / (ny * nx)
    return (amplitude / np.sqrt(power)).astype(np.float32)


def add_ct_noise(hu, spacing, sd: float, kernel: str, rng) -> np.ndarray:
    """The image plus stationary FBP-like noise of standard deviation `sd` HU, everywhere
    (air included, no clipping: real CT air spreads around -1000 too)."""
    image, spacing = check_image(hu, spacing)
    _check_kernel(kernel)
    if not np.isfinite(sd) or sd < 0:
        raise InputError(f"The noise SD must be a number >= 0 HU, got {sd}.")
    if sd == 0:
        return image.copy()
    rng = np.random.default_rng(rng)
    ny, nx = image.shape[-2:]
    white = rng.standard_normal(image.shape, dtype=np.float32)
    spectrum = scipy.fft.rfft2(white, axes=(-2, -1), workers=-1)
    spectrum *= _noise_filter(ny, nx, float(spacing[-2]), float(spacing[-1]), kernel)
    noise = scipy.fft.irfft2(spectrum, s=(ny, nx), axes=(-2, -1), workers=-1)
    return (image + np.float32(sd) * noise).astype(np.float32, copy=False)


def simulate_acquisition(hu, spacing, noise_sd: float, kernel: str, rng) -> np.ndarray:
    """Kernel resolution, then kernel-shaped noise of `noise_sd` HU."""
    return add_ct_noise(apply_kernel(hu, spacing, kernel), spacing, noise_sd, kernel, rng)
