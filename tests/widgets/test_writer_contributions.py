"""Issue 12.8: npe2 writers (OME-TIFF / NIfTI with spacing and units; object table as CSV)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mae.io.readers import read_image


def _labels(viewer, **kwargs):
    data = np.zeros((6, 20, 24), np.uint32)
    data[1:4, 2:8, 3:9] = 1
    data[2:5, 12:18, 14:20] = 7
    return viewer.add_labels(data, name="result", **kwargs)


@pytest.mark.parametrize("suffix", [".tif", ".nii.gz"])
def test_labels_saved_with_spacing_and_units(viewer, tmp_path, suffix):
    layer = _labels(viewer, scale=(2.0, 0.5, 0.25), units=("um", "um", "um"))
    path = tmp_path / f"labels{suffix}"
    written = viewer.layers.save(str(path), selected=False, plugin="napari-mae")
    assert written == [str(path)]
    data, spacing, meta = read_image(path)
    np.testing.assert_array_equal(data, layer.data)
    if suffix == ".tif":
        assert meta["unit"] == "um"
        np.testing.assert_allclose(spacing, (2.0, 0.5, 0.25))
    else:  # NIfTI is in millimetres
        assert meta["unit"] == "mm"
        np.testing.assert_allclose(spacing, (2e-3, 0.5e-3, 0.25e-3))


def test_writer_is_offered_for_tif_labels_and_images():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    for layer_type in ("labels", "image"):
        writers = list(pm.iter_compatible_writers([layer_type]))
        assert any(w.command == "napari-mae.write_layer" and ".tif" in w.filename_extensions for w in writers)


def test_image_time_series_and_singleton_time_point(viewer, tmp_path):
    movie = viewer.add_image(
        np.random.default_rng(0).random((3, 4, 16, 16)).astype(np.float32),
        scale=(5, 2, 1, 1),
        units=("s", "mm", "mm", "mm"),
        name="movie",
    )
    path = tmp_path / "movie.tif"
    viewer.layers.save(str(path), selected=False, plugin="napari-mae")
    data, spacing, meta = read_image(path)
    assert meta["axes"] == "TZYX" and meta["unit"] == "mm"
    np.testing.assert_allclose(data, movie.data)
    np.testing.assert_allclose(spacing, (2, 1, 1))
    viewer.layers.remove(movie)
    one = viewer.add_labels(np.ones((1, 4, 16, 16), np.uint8), scale=(5, 2, 1, 1), name="t1")
    path = tmp_path / "t1.nii"
    viewer.layers.save(str(path), selected=False, plugin="napari-mae")
    data, spacing, _ = read_image(path)
    assert data.shape == (4, 16, 16)
    assert one.data.shape[0] == 1


def test_nifti_labels_overlay_the_scan(viewer, tmp_path):
    """A NIfTI opened through the reader keeps its affine; labels saved from it get it back."""
    import nibabel as nib

    affine = np.array([[-1.5, 0, 0, 10], [0, 0, 2.0, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 6, 5)).astype(np.float32), affine), scan)
    (image,) = viewer.open(str(scan), plugin="napari-mae")
    labels = viewer.add_labels(
        (image.data > 0.5).astype(np.uint8), scale=image.scale, metadata=dict(image.metadata)
    )
    out = tmp_path / "labels.nii.gz"
    viewer.layers.selection = {labels}
    viewer.layers.save(str(out), selected=True, plugin="napari-mae")
    data, _, meta = read_image(out)
    np.testing.assert_array_equal(data, labels.data)
    np.testing.assert_allclose(meta["voxel_affine"], read_image(scan)[2]["voxel_affine"])
    assert not np.allclose(meta["voxel_affine"], np.diag([-1.5, -2.0, 1.0, 1.0]))  # not a default affine


def test_object_table_csv_writer(viewer, tmp_path):
    import pandas as pd

    layer = _labels(viewer, scale=(2.0, 0.5, 0.25))
    layer.features = pd.DataFrame({"label": [1, 7], "volume": [27.0, 27.0]})
    path = tmp_path / "objects.csv"
    viewer.layers.save(str(path), selected=False, plugin="napari-mae")
    assert path.read_text().splitlines() == ["label,volume", "1,27.0", "7,27.0"]
