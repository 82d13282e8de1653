"""measure.object_table (regionprops_table with spacing) and masking.resample_mask."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mae.masking import make_mask, mask_to_pixels, resample_mask
from napari_mae.measure import object_table, write_table_csv


def _two_objects_3d():
    labels = np.zeros((4, 10, 12), np.int32)
    labels[1:3, 2:4, 2:6] = 1  # 16 voxels, centre (1.5, 2.5, 3.5)
    labels[0, 7:9, 9:11] = 5  # 4 voxels, centre (0, 7.5, 9.5)
    return labels


def test_object_table_physical_units_3d():
    labels = _two_objects_3d()
    image = np.where(labels == 1, 10.0, np.where(labels == 5, 2.0, 0.0))
    table = object_table(labels, image, spacing=(2.0, 0.5, 0.25))
    np.testing.assert_array_equal(table["label"], [1, 5])
    np.testing.assert_array_equal(table["pixels"], [16, 4])
    np.testing.assert_allclose(table["volume"], np.array([16, 4]) * 2.0 * 0.5 * 0.25)
    np.testing.assert_allclose(table["centroid_z"], [3.0, 0.0])
    np.testing.assert_allclose(table["centroid_y"], [1.25, 3.75])
    np.testing.assert_allclose(table["centroid_x"], [0.875, 2.375])
    np.testing.assert_allclose(table["mean_intensity"], [10.0, 2.0])


def test_object_table_uncalibrated_2d_has_one_size_column_and_channels():
    labels = _two_objects_3d()[1]
    image = np.stack([labels * 1.0, labels * 3.0])  # (C, Y, X)
    table = object_table(labels, image, channel_axis=0, t=4)
    assert list(table) == [
        "t", "label", "area", "centroid_y", "centroid_x", "mean_intensity-0", "mean_intensity-1"
    ]  # fmt: skip
    np.testing.assert_array_equal(table["t"], [4])
    np.testing.assert_allclose(table["area"], [8])
    np.testing.assert_allclose(table["mean_intensity-1"], [3.0])


def test_object_table_empty_has_the_columns():
    table = object_table(np.zeros((8, 8), np.uint16), spacing=(0.5, 0.5))
    assert {"label", "pixels", "area", "centroid_y", "centroid_x"} <= set(table)
    assert all(len(v) == 0 for v in table.values())


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [
        (np.zeros(5, int), {}),
        (np.zeros((4, 4)), {}),
        (np.zeros((4, 4), int), {"spacing": (1.0,)}),
        (np.zeros((4, 4), int), {"spacing": (1.0, 0.0)}),
        (np.zeros((4, 4), int), {"spacing": (1.0, float("nan"))}),
        (np.zeros((4, 4), int), {"intensity_image": np.zeros((4, 5))}),
    ],
)
def test_object_table_bad_arguments(labels, kwargs):
    with pytest.raises(ValueError):
        object_table(labels, **kwargs)


def test_write_table_csv(tmp_path):
    table = object_table(_two_objects_3d(), spacing=(2.0, 0.5, 0.25))
    path = write_table_csv(tmp_path / "sub" / "objects.csv", table)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(table)
    assert len(lines) == 3 and lines[1].startswith("1,16,4.0,")
    with pytest.raises(ValueError, match="length"):
        write_table_csv(tmp_path / "bad.csv", {"a": [1, 2], "b": [1]})


def test_resample_mask_majority_and_identity():
    shape = (20, 28)
    mask = make_mask(shape, (4, 4), mask_ratio=0.5, seed=1)
    assert resample_mask(mask, shape, (4, 4), (4, 4)).tolist() == mask.tolist()
    coarse = resample_mask(mask, shape, (4, 4), (8, 8))
    assert coarse.shape == (3, 4)
    pixels = mask_to_pixels(mask, shape, (4, 4))
    for (gy, gx), removed in np.ndenumerate(coarse):
        block = pixels[gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 8]  # edge blocks: only pixels inside
        assert removed == (block.mean() > 0.5)
    fine = resample_mask(mask, shape, (4, 4), (2, 2))
    np.testing.assert_array_equal(mask_to_pixels(fine, shape, (2, 2)), pixels)
