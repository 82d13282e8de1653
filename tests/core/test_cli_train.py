"""Tests of ``napari-mae train``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import tifffile

from napari_mae.cli import main


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Four small real microscopy crops (scikit-image's bundled ``cell``)."""
    from skimage import data

    cell = data.cell()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        tifffile.imwrite(folder / f"cell{i}.tif", cell[i * 120 : i * 120 + 48, i * 100 : i * 100 + 64])
    return folder


TINY_ARGS = ["--model", "tiny-2d", "--img-size", "16", "--patch-size", "4", "--batch-size", "2", "--quiet"]


def test_train_command_writes_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(out), "--epochs", "2", *TINY_ARGS]) == 0
    err = capsys.readouterr().err
    assert "training tiny-2d" in err and "finished 4 steps" in err
    for name in ("last.pt", "best.pt", "loss_log.csv", "config.json"):
        assert (out / name).is_file()
    with (out / "loss_log.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    # --resume of a finished run is a user error (exit code 2), not a traceback
    assert main(["train", str(image_folder), "--out", str(out), "--epochs", "2", "--resume", *TINY_ARGS]) == 2
    assert "already finished" in capsys.readouterr().err
    # ... and raising --epochs continues it
    with pytest.warns(UserWarning, match="no longer an exact continuation"):
        assert (
            main(["train", str(image_folder), "--out", str(out), "--epochs", "3", "--resume", *TINY_ARGS])
            == 0
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume"], "cannot resume"),
        (["--model", "default-2d", "--patch-size", "4"], "only be changed for a preset"),
        (["--spatial-dims", "3", "--model", "tiny-2d"], "spatial_dims=3"),
        (["--epochs", "0"], "epochs must be"),
    ],
)
def test_train_command_user_errors(image_folder, tmp_path, capsys, extra, message):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_folder(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *TINY_ARGS])
    assert code == 2
    assert "image folder not found" in capsys.readouterr().err


def test_bad_size_argument(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--patch-size", "a,b"])


def test_train_refuses_to_overwrite_a_run_without_resume(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(image_folder), "--out", str(out), "--epochs", "1", *TINY_ARGS]
    assert main(args) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_train_leaves_annotation_files_out(image_folder, tmp_path, capsys):
    import numpy as np

    labels = image_folder / "labels"
    labels.mkdir()
    tifffile.imwrite(labels / "cell0.tif", np.zeros((48, 64), np.uint16))
    tifffile.imwrite(image_folder / "cell0_mask.tif", np.zeros((48, 64), np.uint8))
    out = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(out), "--epochs", "1", *TINY_ARGS]) == 0
    assert "on 3 images for training and 1 for validation" in capsys.readouterr().err  # the 4 cell crops only


@pytest.mark.parametrize(
    ("volume", "extra", "model", "spatial_dims"),
    [
        (False, [], "default-2d", 2),
        (True, [], "default-3d", 3),
        (True, ["--spatial-dims", "2"], "default-2d", 2),
        (True, ["--model", "tiny-2d"], "tiny-2d", None),
    ],
)
def test_train_default_model_follows_the_data(
    image_folder, tmp_path, capsys, monkeypatch, volume, extra, model, spatial_dims
):
    import numpy as np
    from skimage import data

    from napari_mae import training

    if volume:  # a stack of 10 real crops (4 planes would read as channels)
        for p in image_folder.glob("*.tif"):
            p.unlink()
        cell = data.cell()
        tifffile.imwrite(
            image_folder / "vol.tif", np.stack([cell[i * 10 : i * 10 + 40, :40] for i in range(10)])
        )
    configs = []
    monkeypatch.setattr(training, "train", lambda config, **kw: configs.append(config) or iter(()))
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *extra]) == 0
    assert (configs[0].model, configs[0].spatial_dims) == (model, spatial_dims)
    assert ("vol.tif is a 3D volume" in capsys.readouterr().err) == (model == "default-3d")


def test_failed_train_leaves_no_empty_run_folder(image_folder, tmp_path, capsys):
    import numpy as np

    labels = tmp_path / "labels"
    labels.mkdir()
    for f in image_folder.iterdir():
        tifffile.imwrite(labels / f.name, np.full(tifffile.imread(f).shape, 0.5, np.float32))
    cases = [
        [str(tmp_path / "nope"), *TINY_ARGS],  # a missing data folder
        [str(image_folder), "--model", "tiny-3d", "--quiet"],  # a 3D model on 2D images
        [str(image_folder), "--labels", str(labels), "--quiet"],  # float labels
    ]
    for argv in cases:
        out = tmp_path / "run"
        assert main(["train", *argv, "--out", str(out)]) == 2, argv
        assert not out.exists(), argv
    # a folder that was there before stays, even when the run fails in it
    out.mkdir()
    assert main(["train", *cases[0], "--out", str(out)]) == 2
    assert out.is_dir()
    capsys.readouterr()
