"""One scribble check (segmentation.scribbles.check_scribbles) for segmentation and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from synthetic import five_nuclei

from napari_mae.segmentation import segment_instances
from napari_mae.segmentation.finetune import check_finetune_inputs
from napari_mae.segmentation.scribbles import MAX_STROKE_IDS, check_scribbles


def _strokes(shape=(96, 96)):
    s = np.zeros(shape, np.uint8)
    s[20, 16:25] = 2  # inside nucleus 1 of five_nuclei
    s[5, 5:40] = 1
    return s


def _intensity(img, _):
    return img  # the image itself (uint8, 0..255) given as scribbles


BAD = [
    (_intensity, "look like an intensity image"),
    (lambda img, s: s[:-1], "have shape"),
    (lambda img, s: np.where(s == 1, -1, s.astype(np.int16)), "non-negative"),
    (lambda img, s: s.astype(np.float32) + 0.5, "integer labels"),
    (lambda img, s: np.where(s == 2, np.nan, s), "integer labels"),
    (lambda img, s: np.where(s == 2, 0, s), "no object stroke"),
    (lambda img, s: np.where(s == 1, 0, s), "no background stroke"),
    (lambda img, s: np.zeros_like(s), "no object stroke"),
]


@pytest.mark.parametrize(("change", "match"), BAD)
def test_segmentation_refuses_bad_scribbles(change, match):
    img, _ = five_nuclei()
    with pytest.raises(ValueError, match=match):
        segment_instances(img, scribbles=change(img, _strokes()), method="classical")


@pytest.mark.parametrize(("change", "match"), BAD)
def test_fine_tuning_refuses_the_same_scribbles(change, match):
    img, _ = five_nuclei()
    with pytest.raises(ValueError, match=match):
        check_finetune_inputs(img, change(img, _strokes()))


def test_integer_valued_floats_and_dense_painting_pass_both():
    img, _ = five_nuclei()
    floats = _strokes().astype(np.float32)
    _, (s,), _ = check_finetune_inputs(img, floats)
    assert np.issubdtype(s.dtype, np.integer) and np.array_equal(s, _strokes())
    dense = np.where(img > 90, 2, 1).astype(np.uint8)  # every pixel painted, with two ids
    assert np.array_equal(check_scribbles(dense, dense.shape), dense)
    _, info = segment_instances(img, scribbles=floats, method="classical")
    assert info["mode"] == "scribbles"


def test_many_object_ids_on_few_pixels_are_strokes():
    """Strokes with more than MAX_STROKE_IDS ids pass while most pixels stay unlabelled."""
    s = np.zeros((96, 96), np.uint16)
    s[0, : MAX_STROKE_IDS + 10] = np.arange(2, MAX_STROKE_IDS + 12)
    s[95, :10] = 1
    assert check_scribbles(s, s.shape) is s


def test_cli_finetune_refuses_an_image_as_scribbles_naming_the_file(tmp_path, capsys):
    """The newcomer's `finetune IMG --scribbles IMG` (uint8 0..255) trained; now one line, rc 2."""
    from napari_mae.cli import main

    img, _ = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    out = tmp_path / "tuned.pt"
    path = str(tmp_path / "img.tif")
    assert main(["finetune", path, "--scribbles", path, "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--scribbles {path} look like an intensity image" in err[0]
    assert "distinct values" in err[0] and not out.exists()


def test_a_full_annotation_is_not_taken_for_an_intensity_image():
    """Background 1 everywhere and one id per object (more ids than MAX_STROKE_IDS) is
    scribbles by the convention: accepted, by both callers."""
    from synthetic import random_nuclei

    img, gt = random_nuclei(0, shape=(128, 128), n=MAX_STROKE_IDS + 8, radius=(3, 6))
    full = np.where(gt > 0, gt.astype(np.int32) + 1, 1)
    assert np.unique(full).size > MAX_STROKE_IDS + 1
    out = check_scribbles(full, full.shape)
    assert out.shape == full.shape
    check_finetune_inputs([img], [full])
