"""A volume of one slice is segmented as the 2D image it is (newcomer8: 0 objects as a volume)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from synthetic import random_nuclei

from napari_mae.cli import main
from napari_mae.segmentation import segment_instances


@pytest.fixture
def nuclei():
    return random_nuclei(3, shape=(128, 128), n=14, radius=(6, 9))


@pytest.mark.parametrize(
    ("axis", "spacing"),
    [(0, (2.0, 0.5, 0.5)), (2, (0.5, 0.5, 3.0)), (0, (0.5, 0.5)), (0, None)],
)
def test_one_slice_volume_equals_the_image(nuclei, axis, spacing):
    img, _ = nuclei
    ref, _ = segment_instances(img, method="classical", spacing=None if spacing is None else (0.5, 0.5))
    labels, info = segment_instances(np.expand_dims(img, axis), method="classical", spacing=spacing)
    assert labels.shape == np.expand_dims(img, axis).shape
    np.testing.assert_array_equal(np.squeeze(labels, axis), ref)
    assert len(info["spacing"]) == 2 and info["n_objects"] == ref.max() > 5


def test_one_slice_scribbles_and_cli(nuclei, tmp_path, capsys):
    from napari_mae.segmentation.scribbles import simulate_scribbles

    img, gt = nuclei
    scrib = simulate_scribbles(gt, seed=0)
    ref, _ = segment_instances(img, scribbles=scrib)
    labels, info = segment_instances(img[None], scribbles=scrib[None])
    assert info["mode"] == "scribbles"
    np.testing.assert_array_equal(labels[0], ref)
    tifffile.imwrite(tmp_path / "slice.tif", img[None])  # a plain TIFF: read as (1, Y, X)
    assert main(["segment", str(tmp_path / "slice.tif"), "--method", "classical", "--out", str(tmp_path / "l.tif"),
                 "--quiet"]) == 0  # fmt: skip
    out = tifffile.imread(tmp_path / "l.tif")
    assert out.max() > 5 and out.size == img.size


def test_cli_takes_a_2d_spacing_for_one_slice(nuclei, tmp_path, capsys):
    import json

    img, _ = nuclei
    tifffile.imwrite(tmp_path / "slice.tif", img[None])
    out = tmp_path / "l.tif"
    args = ["segment", str(tmp_path / "slice.tif"), "--method", "classical", "--spacing", "0.5", "0.5"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["spacing"] == [0.5, 0.5] and tifffile.imread(out).max() > 5
