"""``napari-mae segment`` and ``napari-mae evaluate`` end to end on small files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_mae.cli import main


@pytest.fixture
def nuclei(tmp_path):
    gt = np.zeros((96, 96), np.uint16)
    for k, c in enumerate([(20, 20), (20, 70), (70, 30), (60, 75), (45, 48)], start=1):
        gt[disk(c, 7, shape=gt.shape)] = k
    rng = np.random.default_rng(0)
    img = (20 + 150 * (gt > 0) + rng.normal(0, 5, gt.shape)).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", img)
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "img.tif", gt)
    return tmp_path, gt


def test_segment_then_evaluate(nuclei, capsys):
    tmp, gt = nuclei
    (tmp / "pred").mkdir()
    assert main(["segment", str(tmp / "img.tif"), "--out", str(tmp / "pred" / "img.tif"), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["n_objects"] == 5 and info["mode"] == "automatic"
    labels = tifffile.imread(tmp / "pred" / "img.tif")
    assert labels.dtype == np.uint32 and labels.shape == gt.shape
    out_json = tmp / "scores.json"
    assert (
        main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"), "--json", str(out_json)]) == 0
    )
    text = capsys.readouterr().out
    assert "accuracy 1.000" in text
    assert json.loads(out_json.read_text())["summary"]["0.5"]["tp"] == 5


def test_segment_with_scribbles_and_spacing(nuclei, capsys):
    tmp, gt = nuclei
    scrib = np.zeros(gt.shape, np.uint8)
    scrib[20, 18:23] = 2
    scrib[70, 28:33] = 2
    scrib[2, 2:40] = 1
    tifffile.imwrite(tmp / "scrib.tif", scrib)
    out = tmp / "lab.tif"
    rc = main(
        [
            "segment",
            str(tmp / "img.tif"),
            "--scribbles",
            str(tmp / "scrib.tif"),
            "--spacing",
            "0.5",
            "0.5",
            "--out",
            str(out),
            "--quiet",
        ]  # fmt: skip
    )
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["mode"] == "scribbles" and info["spacing"] == [0.5, 0.5]
    assert tifffile.imread(out).max() == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--spacing", "1", "1", "1"], "--spacing"),
        (["--out", "x.png"], "TIFF"),
        (["--radius", "-3"], "--radius must be positive"),
    ],
)
def test_segment_user_errors(nuclei, capsys, extra, message):
    tmp, _ = nuclei
    args = ["segment", str(tmp / "img.tif"), "--out", str(tmp / "o.tif"), "--quiet", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_one_class_scribbles_is_a_clear_error(nuclei, capsys):
    tmp, gt = nuclei
    scrib = np.zeros(gt.shape, np.uint8)
    scrib[2, 2:40] = 1
    tifffile.imwrite(tmp / "scrib.tif", scrib)
    rc = main(
        ["segment", str(tmp / "img.tif"), "--scribbles", str(tmp / "scrib.tif"), "--out", str(tmp / "o.tif")]
    )
    assert rc == 2
    assert "object" in capsys.readouterr().err


def test_segment_objects_polarity_option(tmp_path, capsys):
    """One bright disk covering most of the image: detection takes it for background;
    --objects bright says otherwise."""
    from skimage.draw import disk as draw_disk

    img = np.full((128, 128), 30, np.uint8)
    img[draw_disk((64, 64), 55, shape=img.shape)] = 200
    tifffile.imwrite(tmp_path / "big.tif", img)
    out = tmp_path / "labels.tif"
    assert (
        main(["segment", str(tmp_path / "big.tif"), "--out", str(out), "--objects", "bright", "--quiet"]) == 0
    )
    labels = tifffile.imread(out)
    assert labels.max() == 1 and labels[64, 64] == 1 and labels[2, 2] == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["bright_objects"] is True


def test_evaluate_json_name_checked_before_scoring_and_folder_made(nuclei, capsys):
    tmp, gt = nuclei
    (tmp / "pred").mkdir()
    tifffile.imwrite(tmp / "pred" / "img.tif", gt)
    args = ["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt")]
    assert main([*args, "--json", str(tmp / "scores.txt")]) == 2
    assert "JSON" in capsys.readouterr().err
    assert main([*args, "--json", str(tmp / "new" / "scores.json")]) == 0
    assert json.loads((tmp / "new" / "scores.json").read_text())["summary"]["0.5"]["tp"] == 5


def test_evaluate_without_common_files(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "a"), "--gt", str(tmp_path / "b")]) == 2
    assert "no file names in common" in capsys.readouterr().err


def test_segment_multichannel_tiff_uses_channel_axis(tmp_path):
    """A (C, Y, X) ImageJ stack is read as (Y, X, C) and segmented as a 2D image."""
    import numpy as np
    import tifffile

    from napari_mae.cli import main

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 50, (2, 96, 96)).astype(np.uint8)
    stack[:, 30:50, 30:50] = 200
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "labels.tif"
    assert main(["segment", str(path), "--out", str(out), "--quiet"]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (96, 96)
    assert labels.max() >= 1


def test_segment_channel_axis_counts_the_axes_as_read(tmp_path, capsys):
    """A (C, Y, X) stack is read channels last: --channel-axis 0 (the file's axis) is a
    clear error, not a (96, 2) label image; -1 or no flag works."""
    stack = np.random.default_rng(0).integers(0, 50, (2, 96, 96)).astype(np.uint8)
    stack[:, 30:50, 30:50] = 200
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "labels.tif"
    assert main(["segment", str(path), "--out", str(out), "--channel-axis", "0", "--quiet"]) == 2
    assert "as read" in capsys.readouterr().err and not out.exists()
    assert main(["segment", str(path), "--out", str(out), "--channel-axis", "-1", "--quiet"]) == 0
    assert tifffile.imread(out).shape == (96, 96)


def test_segment_uncalibrated_yx3_stack_as_rgb(tmp_path, capsys):
    """An RGB image saved without its photometric tag reads as 96 pages of 96 x 3: the CLI
    segments it as RGB (as the API does for such arrays), unless --spacing says volume."""
    rgb = np.full((96, 96, 3), 20, np.uint8)
    rgb[30:50, 30:50] = 200
    path = tmp_path / "rgb_untagged.tif"
    tifffile.imwrite(path, rgb, photometric="minisblack")
    out = tmp_path / "labels.tif"
    assert main(["segment", str(path), "--out", str(out), "--quiet"]) == 0
    assert "RGB" in capsys.readouterr().err
    labels = tifffile.imread(out)
    assert labels.shape == (96, 96) and labels.max() == 1
    assert (
        main(["segment", str(path), "--out", str(out), "--spacing", "1", "1", "1", "--overwrite", "--quiet"])
        == 0
    )
    assert tifffile.imread(out).shape == (96, 96, 3)


def test_segment_out_under_a_file_fails_before_work(tmp_path, capsys):
    from napari_mae.cli import main

    (tmp_path / "afile").write_text("x")
    code = main(["segment", "missing.tif", "--out", str(tmp_path / "afile" / "x.tif")])
    assert code == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_evaluate_refuses_probability_maps(tmp_path, capsys):
    import numpy as np

    from napari_mae.cli import main

    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    gt = np.zeros((8, 8), np.uint16)
    gt[2:5, 2:5] = 1
    np.save(tmp_path / "gt" / "a.npy", gt)
    np.save(tmp_path / "pred" / "a.npy", np.where(gt > 0, 0.9, 0.3).astype(np.float32))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    assert "integer instance labels" in capsys.readouterr().err


def test_segment_writes_nifti_in_the_scan_space(tmp_path, sample_data_dir):
    import nibabel as nib
    import numpy as np

    from napari_mae.cli import main

    src = sample_data_dir / "ct_abdomen" / "image.nii.gz"
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    a, b = nib.as_closest_canonical(nib.load(src)), nib.as_closest_canonical(nib.load(out))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine)
