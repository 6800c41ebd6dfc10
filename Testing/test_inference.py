"""The network's view of a CT: axial slices at a pixel size within the network's range,
whatever grid the CT is stored on, and the map back on the CT's own grid."""
from __future__ import annotations

import numpy as np
import torch

from EmphysemaUADLib.inference import PIXEL_RANGE_MM, predict_ct
from EmphysemaUADLib.lungs import segment_lungs
from EmphysemaUADLib.network import build_model
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.volume_io import Geometry, Volume


class ShapeRecorder(torch.nn.Module):
    """Stands in for the network: it flags air-dark input (below about -930 HU) and keeps
    the shapes it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return x, (0.05 - x) * 50


def _phantom(spacing=(2.5, 0.9, 0.9)):
    phantom = make_phantom(seed=3, shape=(16, 128, 128), spacing=spacing, noise=20.0,
                           emphysema="moderate", morphology="centrilobular")
    return phantom.ct, segment_lungs(phantom.ct)


def _stored_coronally(ct: Volume) -> Volume:
    """The same physical image stored as coronal slices: array (y, z reversed, x)."""
    sx, sy, sz = ct.geometry.spacing
    ox, oy, oz = ct.geometry.origin
    array = np.ascontiguousarray(ct.array.transpose(1, 0, 2)[:, ::-1, :])
    top = oz + (ct.shape[0] - 1) * sz
    # ITK index i -> +x, j -> -z (rows run downwards), k -> +y
    geometry = Geometry((sx, sz, sy), (ox, oy, top), (1, 0, 0, 0, 0, 1, 0, -1, 0))
    return Volume(array, geometry, "coronal")


def test_a_coronally_stored_ct_is_scored_on_its_axial_slices():
    ct, lungs = _phantom()
    model = build_model({"architecture": "EDLNet", "width": 4}).eval()
    torch.manual_seed(0)
    axial = predict_ct(ct, lungs, model, torch.device("cpu"))
    coronal_ct = _stored_coronally(ct)
    coronal_lungs = np.ascontiguousarray(lungs.transpose(1, 0, 2)[:, ::-1, :])
    coronal = predict_ct(coronal_ct, coronal_lungs, model, torch.device("cpu"))
    back = coronal[:, ::-1, :].transpose(1, 0, 2)
    assert coronal.shape == coronal_ct.shape
    assert np.abs(back - axial).max() < 1e-5
    assert np.count_nonzero(axial[lungs == 0]) == 0


def test_pixels_outside_the_range_are_resampled_and_the_map_comes_back_on_the_ct_grid():
    for pixel in (PIXEL_RANGE_MM[1] * 2, PIXEL_RANGE_MM[0] / 2, 0.85):
        ct, lungs = _phantom(spacing=(2.5, pixel, pixel))
        recorder = ShapeRecorder()
        scores = predict_ct(ct, lungs, recorder, torch.device("cpu"), batch_size=64)
        assert scores.shape == ct.shape and scores.dtype == np.float32
        assert np.count_nonzero(scores[lungs == 0]) == 0
        box = np.flatnonzero(lungs.any(axis=(0, 2)))
        native = box[-1] - box[0] + 1
        seen = recorder.shapes[0][0]
        expected = native * pixel / np.clip(pixel, *PIXEL_RANGE_MM)
        # the box, its margin and the padding to a multiple of 16 scale with the zoom
        assert abs(seen - expected) < 0.25 * expected + 40, (pixel, native, seen)
        if pixel == 0.85:  # inside the range: the slices as they are
            assert seen <= native + 2 * 8 + 15
        # where the CT is dark (air-like lesions) the stand-in network flags it, on any grid
        dark = (ct.array < -950) & (lungs > 0)
        assert scores[dark].mean() > scores[(lungs > 0) & ~dark].mean()


def test_bfloat16_runs_where_it_is_native_and_float32_can_be_asked_for(monkeypatch):
    from EmphysemaUADLib import inference, training

    monkeypatch.delenv(inference.FLOAT32_ENV, raising=False)
    assert inference.use_bfloat16(torch.device("cuda"))
    assert not inference.use_bfloat16(torch.device("meta"))
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        expected = native and torch.backends.mkldnn.is_available()
        assert inference.use_bfloat16(torch.device("cpu")) == expected
        # training: channels-last goes with bfloat16 on the CPU (float32 gains nothing)
        assert training.channels_last(torch.device("cpu")) == expected
        assert inference.precision(torch.device("cpu")) == ("bfloat16" if expected
                                                           else "float32")
    monkeypatch.setenv(inference.FLOAT32_ENV, "1")
    assert not inference.use_bfloat16(torch.device("cuda"))
    assert inference.precision(torch.device("cpu")) == "float32"
    assert training.channels_last(torch.device("cuda"))


def test_bfloat16_and_float32_maps_agree(monkeypatch):
    import pytest

    from EmphysemaUADLib import inference
    from EmphysemaUADLib.detection import Detector

    monkeypatch.delenv(inference.FLOAT32_ENV, raising=False)
    if not inference.use_bfloat16(torch.device("cpu")):
        pytest.skip("this CPU has no native bfloat16: detection runs in float32 here")
    ct, lungs = _phantom()
    detector = Detector.load(device="cpu")
    fast = predict_ct(ct, lungs, detector.model, detector.device)
    monkeypatch.setenv(inference.FLOAT32_ENV, "1")
    exact = predict_ct(ct, lungs, detector.model, detector.device)
    assert not np.array_equal(fast, exact)  # the switch changes the arithmetic
    assert np.abs(fast - exact).max() < 0.05
    inside = lungs > 0
    assert np.mean((fast > 0.5)[inside] != (exact > 0.5)[inside]) < 1e-3
