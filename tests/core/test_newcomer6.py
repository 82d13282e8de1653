"""Findings of a newcomer's second try (session 6): each refused in one line, nothing lost."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile
from synthetic import five_nuclei

from napari_mae.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["image", "scribbles"])
def test_segment_overwrite_never_replaces_an_input(tmp_path, capsys, which):
    """`segment in.tif --out in.tif --overwrite` replaced the image (or the strokes) with labels."""
    img, gt = five_nuclei()
    tifffile.imwrite(tmp_path / "in.tif", img)
    strokes = np.zeros(img.shape, np.uint8)
    strokes[20, 16:25], strokes[5, 5:40] = 2, 1
    tifffile.imwrite(tmp_path / "s.tif", strokes)
    target = tmp_path / ("in.tif" if which == "image" else "s.tif")
    before = _digest(target)
    args = ["segment", str(tmp_path / "in.tif"), "--out", str(target), "--overwrite", "--quiet"]
    if which == "scribbles":
        args += ["--scribbles", str(tmp_path / "s.tif")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "same file as" in err and len(err.strip().splitlines()) == 1
    assert _digest(target) == before


@pytest.mark.parametrize("radius", [1e12, 97.0])
def test_a_radius_beyond_the_image_is_refused(radius):
    """A radius of 1e12 ran the machine out of memory; above the image's extent nothing fits."""
    from napari_mae.segmentation import segment_instances

    img, _ = five_nuclei()
    with pytest.raises(ValueError, match="larger than the image"):
        segment_instances(img, object_radius=radius)
    labels, info = segment_instances(img, object_radius=6.0)  # within it: fine
    assert info["n_objects"] == 5


def test_cli_radius_beyond_the_image_is_one_line(tmp_path, capsys):
    img, _ = five_nuclei()
    tifffile.imwrite(tmp_path / "in.tif", img)
    assert (
        main(["segment", str(tmp_path / "in.tif"), "--out", str(tmp_path / "l.tif"), "--radius", "1e12"]) == 2
    )
    err = capsys.readouterr().err
    assert "larger than the image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "l.tif").exists()


def test_finetune_refuses_a_radius_beyond_the_image_and_mixed_kinds(tiny_model, tmp_path):
    """`finetune --radius 1e12` trained on one labelled pixel and saved a useless model; a 2D
    image in pixels with a volume in µm averaged radii of two units into one."""
    from napari_mae.segmentation.finetune import FinetuneConfig, finetune

    img, gt = five_nuclei()
    strokes = np.zeros(img.shape, np.uint8)
    strokes[20, 16:25], strokes[5, 5:40] = 2, 1
    cfg = FinetuneConfig(seconds=None, steps=2, eval_every=2, batch_size=2, crop_size=64, device="cpu")
    out = tmp_path / "t.pt"
    with pytest.raises(ValueError, match="larger than the image"):
        next(finetune(img, strokes, out=out, model=tiny_model, object_radius=1e12, config=cfg))
    vol = np.stack([img] * 8)
    vstrokes = np.zeros(vol.shape, np.uint8)
    vstrokes[4] = strokes
    with pytest.raises(ValueError, match="2D images or volumes, not both"):
        next(finetune([img, vol], [strokes, vstrokes], out=out, model=tiny_model, config=cfg))
    assert not out.exists()


@pytest.mark.parametrize("value", ["5", "-1", "0"])
def test_cli_threshold_outside_0_1_is_one_line(tmp_path, capsys, value):
    """`--threshold 5` gave 0 objects and `-1` five, both with exit 0."""
    img, _ = five_nuclei()
    tifffile.imwrite(tmp_path / "in.tif", img)
    assert (
        main(["segment", str(tmp_path / "in.tif"), "--out", str(tmp_path / "l.tif"), "--threshold", value])
        == 2
    )
    err = capsys.readouterr().err
    assert "--threshold must be in (0, 1)" in err and len(err.strip().splitlines()) == 1


def test_batch_out_equal_to_the_input_folder_says_so(tmp_path, capsys):
    img, _ = five_nuclei()
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", img)
    assert main(["segment", str(folder), "--out", str(folder), "--overwrite"]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif"]


def test_nifti_of_a_micrometre_volume_is_in_millimetres(tmp_path):
    """A µm TIFF's labels written as NIfTI kept the µm numbers (zooms 0.127, units unknown)."""
    import nibabel as nib

    from napari_mae.io.writers import write_image

    path = write_image(
        tmp_path / "l.nii.gz", np.zeros((4, 5, 6), np.uint16), spacing=(0.284, 0.127, 0.127), unit="um"
    )
    img = nib.load(path)
    np.testing.assert_allclose(img.header.get_zooms(), (0.000127, 0.000127, 0.000284), rtol=1e-4)
    assert img.header.get_xyzt_units()[0] == "mm"
