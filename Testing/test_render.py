"""PNG previews: size from the physical extent, radiological orientation, overlays, text."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.render import GAP_PX, preview_rgb, render_preview
from EmphysemaUADLib.volume_io import Geometry, Volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def marked_volume(direction=IDENTITY):
    """(z, y, x) = (10, 20, 30), 3 mm slices, 1 mm pixels, lung-grey background; a bright
    block at the patient's right-anterior-superior corner whatever the direction."""
    array = np.full((10, 20, 30), -850.0, np.float32)
    d = np.asarray(direction).reshape(3, 3)
    # index ranges that lie towards R (-x), A (-y), S (+z) in patient space
    ix = slice(0, 5) if d[0, 0] > 0 else slice(25, 30)
    iy = slice(0, 4) if d[1, 1] > 0 else slice(16, 20)
    iz = slice(7, 10) if d[2, 2] > 0 else slice(0, 3)
    array[iz, iy, ix] = 400.0
    return Volume(array, Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), tuple(direction)))


@pytest.mark.parametrize("direction", [IDENTITY, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
                                       (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)])
def test_radiological_orientation_and_physical_aspect(direction):
    ct = marked_volume(direction)
    z = 8 if direction[8] > 0 else 1
    y = 2 if direction[4] > 0 else 17
    image = preview_rgb(ct, axial_index=z, coronal_index=y)
    # axial 20 x 30 px, coronal 10 slices x 3 mm = 30 px tall, 30 wide
    assert image.shape == (30, 30 + GAP_PX + 30, 3)
    grey = image[..., 0].astype(int)
    axial, coronal = grey[:20, :30], grey[:, 30 + GAP_PX:]
    # patient right on the image left, anterior up; superior up on the coronal view
    assert axial[:4, :5].min() == 255 and axial[:, 5:].max() < 255
    assert coronal[:8, :5].min() == 255 and coronal[10:, :].max() < 255  # 3 slices of 3 mm
    assert coronal[:, 5:].max() < 255


def test_render_preview_writes_a_png_with_overlay(tmp_path):
    ct = marked_volume()
    labels = np.zeros(ct.shape, np.uint8)
    labels[5, 10:15, 10:20] = 1
    outline = np.zeros(ct.shape, np.uint8)
    outline[:, 3:18, 2:28] = 1
    path = render_preview(ct, tmp_path / "sub" / "p.png", labels=labels, outline=outline)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert image.shape == (30, 64, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.png"]  # nothing left over
    # default axial slice: the one with the most labels (z = 5); lesion tinted red
    axial = image[:20, :30].astype(int)
    lesion = axial[12, 15]
    assert lesion[0] > lesion[1] + 40
    assert tuple(axial[3, 10]) != tuple(axial[4, 10])  # the outline's top edge


def test_figures_have_a_fixed_size_whatever_the_ct(tmp_path):
    """The case overlay (matplotlib) is 1200 x 1000 px for a tiny and a one-slice CT."""
    from EmphysemaUADLib.plots import case_overlay, save_figure
    from EmphysemaUADLib.render import preview_views

    for n, ct in enumerate((marked_volume(), Volume(marked_volume().array[:1],
                                                      marked_volume().geometry))):
        axial, coronal, pixel = preview_views(ct)
        fig = case_overlay(axial, coronal if coronal.shape[0] > 2 else axial, pixel, "title",
                           "subtitle", ("Region", "Volume\n(mL)"), [["whole lung", "1"]],
                           highlight=[0], notes=["note"])
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(save_figure(fig, tmp_path /
                                                                      f"{n}.png"))))
        assert image.shape[:2] == (1000, 1200)


def test_bad_overlay_and_index_are_refused():
    ct = marked_volume()
    with pytest.raises(InputError, match="does not match"):
        preview_rgb(ct, labels=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(InputError, match="outside the volume"):
        preview_rgb(ct, axial_index=10)
