"""An intensity image taken for labels (evaluate, finetune --labels), and CLI messages that
name the option or the file's own shape and come before the slow work (newcomer 7)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from synthetic import five_nuclei, random_nuclei

from napari_mae.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _slow(*args, **kwargs):
    raise AssertionError("the refusal should have come before this")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _speckled(gt: np.ndarray, seed: int = 0) -> np.ndarray:
    """An intensity image with a 0 background: grey levels 1..40 at random inside the objects."""
    rng = np.random.default_rng(seed)
    return np.where(gt > 0, rng.integers(1, 41, gt.shape), 0).astype(np.uint8)


def _strokes(shape) -> np.ndarray:
    s = np.zeros(shape, np.uint8)
    s[20, 16:25] = 2  # inside nucleus 1 of five_nuclei
    s[5, 5:40] = 1
    return s


# ----------------------------------------------------------------------------- the rule


def _as_ids(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:  # an RGB(A) PNG read as Y, X, C
        a = a[..., 0]
    return a if np.issubdtype(a.dtype, np.integer) else a.astype(np.int64)


def test_no_label_image_of_the_shared_data_is_taken_for_an_intensity_image(shared_data):
    """Every labels file (2D DSB instances, 3D nuclei, dense cells, CT/MR class maps, lesion
    masks) passes; every DSB dev image and every 3D image is refused."""
    from napari_mae.io.readers import read_image
    from napari_mae.segmentation.scribbles import intensity_like

    label_files = sorted(shared_data.glob("*/labels/*"))
    image_files = sorted((shared_data / "dsb2018_fluo_nuclei_2d" / "images").iterdir())
    image_files += [f for f in sorted(shared_data.glob("*/images/*")) if "dsb2018" not in str(f)]
    assert label_files and image_files
    taken = [f.name for f in label_files if intensity_like(_as_ids(read_image(f)[0])) is not None]
    assert taken == []
    missed = [f.name for f in image_files if intensity_like(_as_ids(read_image(f)[0])) is None]
    assert missed == []


def test_the_rule_keeps_labels_of_any_layout():
    from napari_mae.segmentation.scribbles import intensity_like

    _, gt = random_nuclei(0, shape=(128, 128), n=40, radius=(3, 6))
    assert intensity_like(gt) is None
    assert intensity_like(gt + 1) is None  # every pixel labelled (dense cells)
    assert intensity_like(np.arange(64 * 64).reshape(64, 64)) is None  # 4096 ids, one pixel each
    binary = (np.random.default_rng(0).random((64, 64)) > 0.5).astype(np.uint8)
    assert intensity_like(binary) is None  # one value in many pieces: a mask, not an image
    why = intensity_like(_speckled(gt))
    assert why is not None and "distinct values" in why and "separate regions" in why


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_an_intensity_image_as_prediction(tmp_path, capsys):
    """The newcomer's DSB image in --pred was scored as labels (FP 107, rc 0)."""
    img, gt = random_nuclei(0, shape=(96, 96), n=10, radius=(4, 7))
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "good").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", gt)
    tifffile.imwrite(tmp_path / "good" / "a.tif", gt)
    bad = tmp_path / "pred" / "a.tif"
    tifffile.imwrite(bad, _speckled(gt))  # holds 0 where there is no object: "no 0 pixel" would pass it
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    line = _one_line(capsys)
    assert str(bad) in line and "intensity image" in line
    tifffile.imwrite(bad, img)  # the image itself
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    assert "intensity image" in _one_line(capsys)
    assert main(["evaluate", "--pred", str(tmp_path / "good"), "--gt", str(tmp_path / "gt")]) == 0
    assert "accuracy 1.000" in capsys.readouterr().out


# ----------------------------------------------------------------------------- finetune --labels


def test_corrected_labels_that_are_an_intensity_image_are_refused():
    from napari_mae.segmentation.finetune import check_corrected_labels, check_finetune_inputs

    img, gt = five_nuclei()
    with pytest.raises(ValueError, match="look like an intensity image"):
        check_finetune_inputs([img], [_strokes(img.shape)], [_speckled(gt).astype(np.int32)])
    with pytest.raises(ValueError, match="label every pixel"):  # newcomer 4's rule stays
        check_corrected_labels(img.astype(np.int32) + 1, img.shape)
    assert check_corrected_labels(gt, gt.shape) is not None


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda gt: _speckled(gt), "look like an intensity image"),
        (lambda gt: np.where(gt == 1, -1, gt).astype(np.int16), "hold negative ids"),
        (lambda gt: gt[:-1], "have shape"),
        (lambda gt: gt.astype(np.float32), "integer instance ids"),
    ],
)
def test_finetune_cli_checks_labels_with_the_core_before_the_model(
    tmp_path, capsys, monkeypatch, labels, match
):
    """The CLI had its own dtype check and let the rest through to the run; now the core's
    check_corrected_labels, on the file, before the model loads."""
    import napari_mae.segmentation.finetune as core

    img, gt = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", _strokes(img.shape))
    path = tmp_path / "l.tif"
    tifffile.imwrite(path, labels(gt))
    monkeypatch.setattr(core, "finetune", _slow)
    out = tmp_path / "tuned.pt"
    argv = ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif")]
    assert main([*argv, "--labels", str(path), "--out", str(out), "--steps", "1"]) == 2
    line = _one_line(capsys)
    assert f"--labels {path}" in line and match in line and not out.exists()


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seconds", "0"), ("--seconds", "nan"), ("--steps", "0"), ("--encoder-blocks", "-1")],
)
def test_finetune_bad_budget_names_the_option_before_the_model(tmp_path, capsys, monkeypatch, option, value):
    """It said "seconds=0.0 must be > 0" after loading the model."""
    import napari_mae.cli.finetune as cli_finetune

    img, _ = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", _strokes(img.shape))
    monkeypatch.setattr(cli_finetune, "check_segmentation_model", _slow)
    argv = ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif")]
    assert main([*argv, "--out", str(tmp_path / "t.pt"), option, value]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"napari-mae finetune: error: {option} must be"), line


def test_segment_one_image_into_a_folder_says_it_is_a_folder(tmp_path, capsys):
    img, _ = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    out = tmp_path / "results"
    out.mkdir()
    assert main(["segment", str(tmp_path / "img.tif"), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert f"--out {out} is a folder" in line and "a folder or a glob as IMAGE" in line
    assert not any(out.iterdir())


@pytest.mark.parametrize("command", ["segment", "reconstruct"])
def test_time_axis_message_gives_the_files_own_shape(tmp_path, capsys, command):
    """A (2, 3, 4, 32, 32) TIFF without metadata was described only as read: (2, 3, 32, 32, 4)."""
    path = tmp_path / "big5d.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4, 32, 32), np.uint8), photometric="rgb", planarconfig="separate")
    assert main([command, str(path), "--out", str(tmp_path / "o.tif")]) == 2
    line = _one_line(capsys)
    assert "time axis" in line and "(2, 3, 4, 32, 32)" in line and "(2, 3, 32, 32, 4)" in line
    assert str(path) in line


def test_time_axis_message_of_a_batch_file(tmp_path):
    from napari_mae.batch import _segment_one

    path = tmp_path / "big5d.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4, 32, 32), np.uint8), photometric="rgb", planarconfig="separate")
    with pytest.raises(ValueError, match=r"file's shape \(2, 3, 4, 32, 32\)"):
        _segment_one(
            path, spacing=None, object_radius=None, threshold=None, bright_objects=None,
            method="classical", model=None, progress=None,
        )  # fmt: skip


@pytest.mark.parametrize("shape,model", [((64, 64), "default-3d"), ((8, 64, 64), "default-2d")])
def test_reconstruct_model_mismatch_prints_no_progress_bar_first(tmp_path, capsys, shape, model):
    """A '0/1 window' bar was printed before the (clear) error; progress starts after the checks."""
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8))
    assert main(["reconstruct", str(path), "--model", model, "--out", str(tmp_path / "r.tif")]) == 2
    line = _one_line(capsys)
    assert "model" in line and "window" not in line
