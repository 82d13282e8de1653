"""CLI fixes from a newcomer's walk through the README (model names, resume, evaluate pairing, outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_mae.cli import main


@pytest.fixture
def nuclei(tmp_path):
    gt = np.zeros((64, 64), np.uint16)
    for k, c in enumerate([(16, 16), (16, 46), (46, 20), (44, 48)], start=1):
        gt[disk(c, 6, shape=gt.shape)] = k
    rng = np.random.default_rng(0)
    img = (20 + 150 * (gt > 0) + rng.normal(0, 5, gt.shape)).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", img)
    return tmp_path, img, gt


@pytest.mark.parametrize("model", ["nonexist.pt", "defualt-2d"])
def test_segment_auto_refuses_a_missing_model(nuclei, capsys, model):
    tmp, _, _ = nuclei
    out = tmp / "x.tif"
    assert main(["segment", str(tmp / "img.tif"), "--model", model, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and model in err and "default-2d" in err
    assert not out.exists()


def test_segment_instances_refuses_a_missing_model_path(tmp_path):
    from napari_mae.segmentation import segment_instances

    with pytest.raises(FileNotFoundError, match="no such file"):
        segment_instances(np.zeros((32, 32), np.float32), model=tmp_path / "missing.pt")


def test_readme_name_of_the_bundled_decoder_is_accepted():
    from napari_mae._names import bundled_segmenter_path

    assert bundled_segmenter_path("default-2d-nuclei") == bundled_segmenter_path("default-2d")


def test_segment_auto_with_readme_decoder_name_runs_learned(nuclei, capsys):
    from napari_mae._names import bundled_segmenter_path

    if not bundled_segmenter_path("default-2d").is_file():
        pytest.skip("bundled segmentation weights not present")
    tmp, _, _ = nuclei
    out = tmp / "x.tif"
    assert (
        main(["segment", str(tmp / "img.tif"), "--model", "default-2d-nuclei", "--out", str(out), "--quiet"])
        == 0
    )
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["method"] == "learned"


def test_batch_resume_redoes_a_file_whose_labels_were_deleted(nuclei, capsys):
    tmp, img, _ = nuclei
    src = tmp / "images"
    src.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(src / f"{name}.tif", img)
    out = tmp / "seg"
    assert main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    (out / "a_labels.tif").unlink()
    capsys.readouterr()
    assert main(["segment", str(src), "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "a_labels.tif").is_file()
    assert tifffile.imread(out / "a_labels.tif").max() == 4


def test_evaluate_pairs_batch_labels_names_and_counts_missing_predictions(nuclei, capsys):
    tmp, _, gt = nuclei
    (tmp / "gt").mkdir()
    (tmp / "pred").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp / "gt" / f"{name}.tif", gt)
    tifffile.imwrite(tmp / "pred" / "a_labels.tif", gt)  # as segment DIR --out OUT names it; b missing
    out_json = tmp / "scores.json"
    args = ["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"), "--json", str(out_json)]
    assert main(args) == 0
    text = capsys.readouterr().out
    summary = json.loads(out_json.read_text())["summary"]["0.5"]
    assert (summary["tp"], summary["fp"], summary["fn"], summary["n_images"]) == (4, 0, 4, 2)
    assert "accuracy 0.500" in text and "no prediction" in text


def test_evaluate_checks_every_file_before_printing(nuclei, capsys):
    tmp, _, gt = nuclei
    (tmp / "gt").mkdir()
    (tmp / "pred").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp / "gt" / f"{name}.tif", gt)
    tifffile.imwrite(tmp / "pred" / "a.tif", gt)
    tifffile.imwrite(tmp / "pred" / "b.tif", gt[:32])
    assert main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "differs from ground truth" in captured.err


def test_segmentation_checkpoint_where_an_mae_is_expected_is_one_clear_line(nuclei, capsys):
    from napari_mae._names import bundled_segmenter_path
    from napari_mae.io.checkpoint import CheckpointError
    from napari_mae.models.mae import load_model

    seg = bundled_segmenter_path("default-2d")
    if not seg.is_file():
        pytest.skip("bundled segmentation weights not present")
    with pytest.raises(CheckpointError, match="is a segmentation model"):
        load_model(seg)
    tmp, _, _ = nuclei
    assert main(["reconstruct", str(tmp / "img.tif"), "--model", str(seg), "--out", str(tmp / "r.tif")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "segment --method learned" in err and "MAEConfig" not in err
    assert not (tmp / "r.tif").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--out", "r.tif", "--save-mask", "r.tif"],
        ["--out", "r.tif", "--save-error", "./r.tif"],
        ["--out", "img.tif"],
    ],
)
def test_reconstruct_refuses_one_path_for_two_files(nuclei, capsys, monkeypatch, extra):
    tmp, img, _ = nuclei
    monkeypatch.chdir(tmp)
    assert main(["reconstruct", "img.tif", "--model", "tiny-2d", *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "same file" in err
    assert not (tmp / "r.tif").exists()
    np.testing.assert_array_equal(tifffile.imread(tmp / "img.tif"), img)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_array_without_out_is_refused_before_any_work(tmp_path, capsys, zarr_format):
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "plain.zarr"
    arr = zarr.create_array(str(path), shape=(8, 16, 16), dtype="u1", zarr_format=zarr_format)
    arr[:] = 1
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    args = ["segment", str(path), "--spacing", "0.28", "0.127", "0.127", "--workers", "0", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain Zarr array" in err and "--out" in err
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before  # nothing written into the input


def test_batch_refuses_a_missing_model_before_writing(nuclei, capsys):
    tmp, img, _ = nuclei
    src = tmp / "images"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    out = tmp / "seg"
    assert main(["segment", str(src), "--out", str(out), "--model", "defualt-2d", "--quiet"]) == 2
    assert "defualt-2d" in capsys.readouterr().err and not out.exists()


def test_segment_auto_says_when_an_mae_model_is_not_used(nuclei, capsys):
    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models.mae import build_model

    tmp, _, _ = nuclei
    mae = save_checkpoint(tmp / "mae.pt", build_model("tiny-2d"))
    out = tmp / "x.tif"
    assert main(["segment", str(tmp / "img.tif"), "--model", str(mae), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["method"] == "classical"  # documented
    assert "not a segmentation model" in captured.err and out.is_file()
