"""CT acquisition simulation: kernel resolution and FBP-like correlated noise."""
from __future__ import annotations

import numpy as np
import pytest

from EmphysemaUADLib.acquisition import (KERNELS, NOISE_LEVELS, add_ct_noise, apply_kernel,
                                         simulate_acquisition)
from EmphysemaUADLib.errors import InputError

SPACING = (0.7, 0.7)


def _radial_power(noise, spacing):
    """Share of the noise power above 0.4 cycles/mm (fine grain)."""
    power = np.abs(np.fft.fft2(noise)) ** 2
    fy = np.fft.fftfreq(noise.shape[0], d=spacing[0])[:, None]
    fx = np.fft.fftfreq(noise.shape[1], d=spacing[1])[None, :]
    return power[np.hypot(fy, fx) > 0.4].sum() / power.sum()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sd", NOISE_LEVELS)
def test_noise_sd_in_uniform_region_matches_request(kernel, sd):
    air = np.full((256, 256), -1000.0, dtype=np.float32)
    noisy = add_ct_noise(air, SPACING, sd, kernel, np.random.default_rng(1))
    region = noisy[48:208, 48:208]
    assert abs(region.std() - sd) <= 0.1 * sd
    assert abs(region.mean() + 1000.0) < 0.2 * sd
    # air is noisy too and is not clipped at -1000
    assert noisy.min() < -1000.0 - 2 * sd and noisy.max() > -1000.0 + 2 * sd


def test_noise_sd_in_a_volume_with_anisotropic_spacing():
    volume = np.full((6, 128, 160), -850.0, dtype=np.float32)
    noisy = add_ct_noise(volume, (2.5, 0.8, 0.6), 35.0, "sharp", np.random.default_rng(2))
    assert noisy.dtype == np.float32 and noisy.shape == volume.shape
    for z in range(volume.shape[0]):
        assert abs(noisy[z, 16:112, 16:144].std() - 35.0) <= 3.5


def test_sharp_noise_is_finer_grained_than_smooth():
    flat = np.zeros((256, 256), dtype=np.float32)
    fine = {k: _radial_power(add_ct_noise(flat, SPACING, 20.0, k, np.random.default_rng(3)),
                             SPACING) for k in KERNELS}
    assert fine["sharp"] > 0.6 and fine["smooth"] < 0.35 and fine["sharp"] > 2 * fine["smooth"]
    # neighbouring pixels: smooth noise is strongly correlated (blotches), sharp much less
    corr = {}
    for k in KERNELS:
        n = add_ct_noise(flat, SPACING, 20.0, k, np.random.default_rng(3))
        corr[k] = np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1]
    assert corr["smooth"] > 0.4 and corr["sharp"] < corr["smooth"] - 0.3


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_preserves_mean_and_shape(kernel):
    rng = np.random.default_rng(4)
    image = rng.normal(-700.0, 200.0, (96, 80)).astype(np.float32)
    image[30:60, 20:50] = 40.0
    out = apply_kernel(image, SPACING, kernel)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(float(out.mean()) - float(image.mean())) < 0.05


def test_smooth_blurs_and_sharp_overshoots_at_an_edge():
    edge = np.full((64, 64), -900.0, dtype=np.float32)
    edge[:, 32:] = 0.0
    smooth = apply_kernel(edge, SPACING, "smooth")
    sharp = apply_kernel(edge, SPACING, "sharp")
    assert smooth.max() <= 0.01 and smooth.min() >= -900.01  # no overshoot
    assert -900.0 < smooth[32, 31] < -450.0  # partial volume at the edge
    overshoot = sharp.max() - 0.0
    assert 20.0 < overshoot < 200.0  # mild, as in lung kernels
    assert sharp.min() < -920.0
    # white noise: the smooth kernel lowers it, the sharp one does not
    noise = np.random.default_rng(5).normal(0.0, 50.0, (128, 128)).astype(np.float32)
    assert apply_kernel(noise, SPACING, "smooth").std() < 30.0
    assert apply_kernel(noise, SPACING, "sharp").std() > 45.0


def test_3d_kernel_and_noise_act_in_plane_only():
    rng = np.random.default_rng(6)
    volume = rng.normal(-800.0, 100.0, (4, 48, 48)).astype(np.float32)
    spacing = (3.0, 0.7, 0.7)
    for kernel in KERNELS:
        out = apply_kernel(volume, spacing, kernel)
        for z in range(4):
            np.testing.assert_allclose(out[z], apply_kernel(volume[z], spacing[1:], kernel),
                                       atol=1e-3)


def test_deterministic_from_the_rng():
    image = np.full((64, 64), -860.0, dtype=np.float32)
    a = simulate_acquisition(image, SPACING, 20.0, "sharp", np.random.default_rng(7))
    b = simulate_acquisition(image, SPACING, 20.0, "sharp", np.random.default_rng(7))
    c = simulate_acquisition(image, SPACING, 20.0, "sharp", np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_simulate_acquisition_is_kernel_then_noise():
    rng = np.random.default_rng(9)
    image = rng.normal(-800.0, 50.0, (40, 40)).astype(np.float32)
    expected = add_ct_noise(apply_kernel(image, SPACING, "smooth"), SPACING, 10.0, "smooth",
                            np.random.default_rng(10))
    got = simulate_acquisition(image, SPACING, 10.0, "smooth", np.random.default_rng(10))
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(add_ct_noise(image, SPACING, 0.0, "sharp", rng), image)


@pytest.mark.parametrize("call", [
    lambda img: apply_kernel(img, SPACING, "B70f"),
    lambda img: add_ct_noise(img, SPACING, -5.0, "sharp", 0),
    lambda img: add_ct_noise(img, (0.7,), 5.0, "sharp", 0),
    lambda img: apply_kernel(img, (0.7, 0.0), "smooth"),
    lambda img: apply_kernel(img[0], (0.7,), "smooth"),
])
def test_bad_input_is_refused(call):
    with pytest.raises(InputError):
        call(np.zeros((16, 16), dtype=np.float32))
