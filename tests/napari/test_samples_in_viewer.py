"""File > Open Sample and the reader, in a real napari viewer (pytest-xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

EXPECTED = {
    "nuclei_2d": ((520, 696), np.uint8, (1.0, 1.0)),
    "nuclei_3d": ((100, 100, 100), np.uint8, (0.2837, 0.1268, 0.1268)),
    "ct_abdomen": ((30, 101, 122), np.int16, (3.0, 3.0, 3.0)),
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_open_sample(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mae", key)
    shape, dtype, scale = EXPECTED[key]
    image = next(layer for layer in viewer.layers if layer._type_string == "image")
    labels = next(layer for layer in viewer.layers if layer._type_string == "labels")
    assert image.data.shape == shape
    assert image.data.dtype == dtype
    np.testing.assert_allclose(image.scale, scale, rtol=1e-3)
    np.testing.assert_allclose(labels.scale, scale, rtol=1e-3)
    assert labels.data.shape == shape
    assert labels.data.max() > 0


def test_open_nifti_through_plugin(make_napari_viewer, tmp_path):
    import nibabel as nib

    data = np.zeros((6, 5, 4), np.int16)
    data[1:3] = 100
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.8, 2.5, 1.0])), path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-mae")
    layer = viewer.layers["scan"]
    assert layer.data.shape == (4, 5, 6)
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.5))
