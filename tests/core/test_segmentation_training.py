"""Segmentation training through the objective-agnostic loop: a tiny decoder on synthetic nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from synthetic import random_nuclei

from napari_mae.training.loop import run
from napari_mae.training.objectives import loop_config
from napari_mae.training.segmentation import SegmentationConfig, SegmentationObjective, match_label_files


@pytest.fixture
def pairs(tmp_path: Path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for k in range(4):
        img, lab = random_nuclei(k)
        tifffile.imwrite(images / f"n{k}.tif", img)
        tifffile.imwrite(labels / f"n{k}.tif", lab)
    return images, labels


def _config(images, labels, out, **kw):
    base = dict(
        model="tiny-2d",
        features=4,
        crop_size=32,
        samples_per_image=2,
        epochs=2,
        batch_size=4,
        val_fraction=0.25,
        frozen_epochs=1,
        device="cpu",
        checkpoint_every=0,
        seed=0,
    )
    return SegmentationConfig(images, labels, out, **{**base, **kw})


def test_trains_keeps_best_by_val_acc_and_loads(pairs, tmp_path):
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.models.decoder import load_segmenter

    cfg = _config(*pairs, tmp_path / "run")
    updates = list(run(SegmentationObjective(cfg), loop_config(cfg)))
    assert updates[-1].kind == "finished", updates[-1].message
    epochs = [u for u in updates if u.kind == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= u.metrics["val_acc50"] <= 1.0 for u in epochs)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["config"]["task"] == "segmentation"
    net = load_segmenter(tmp_path / "run" / "best.pt")
    assert net.decoder_config.object_radius == 8.0


@pytest.mark.parametrize(("frozen_epochs", "moved"), [(1, False), (0, True)])
def test_encoder_frozen_then_trained(pairs, tmp_path, frozen_epochs, moved):
    import torch

    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.models.mae import build_model, load_model

    mae_path = save_checkpoint(tmp_path / "mae.pt", build_model("tiny-2d"))
    cfg = _config(*pairs, tmp_path / "run", model=str(mae_path), epochs=1, frozen_epochs=frozen_epochs)
    list(run(SegmentationObjective(cfg), loop_config(cfg)))
    start = load_model(mae_path).blocks.state_dict()
    after = load_segmenter(tmp_path / "run" / "last.pt").encoder.blocks.state_dict()
    changed = any(not torch.equal(start[k], after[k]) for k in start)
    assert changed is moved


def test_resume_is_exact(pairs, tmp_path):
    import torch

    from napari_mae.io.checkpoint import load_checkpoint

    full = _config(*pairs, tmp_path / "full")
    list(run(SegmentationObjective(full), loop_config(full)))
    part = _config(*pairs, tmp_path / "part")
    n = [0]

    def stop():
        n[0] += 1
        return n[0] > 3

    list(run(SegmentationObjective(part), loop_config(part), stop=stop))
    resumed = _config(*pairs, tmp_path / "part", resume=True)
    list(run(SegmentationObjective(resumed), loop_config(resumed)))
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _write(folder: Path, name: str, array):
    folder.mkdir(exist_ok=True)
    tifffile.imwrite(folder / name, array)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "no labels .* for n3.tif"),
        ("extra", "labels without an image: zz.tif"),
        ("shape", "does not match"),
        ("float", "integer"),
        ("negative", "negative"),
        ("empty", "empty"),
    ],
)
def test_bad_labels_named_and_nothing_written(pairs, tmp_path, case, match):
    images, labels = pairs
    if case == "missing":
        (labels / "n3.tif").unlink()
    elif case == "extra":
        _write(labels, "zz.tif", np.zeros((8, 8), np.uint16))
    elif case == "shape":
        _write(labels, "n1.tif", np.zeros((50, 50), np.uint16))
    elif case == "float":
        _write(labels, "n1.tif", np.zeros((96, 96), np.float32))
    elif case == "negative":
        _write(labels, "n1.tif", -np.ones((96, 96), np.int16))
    elif case == "empty":
        _write(labels, "n1.tif", np.zeros((96, 96), np.uint16))
    out = tmp_path / "run"
    cfg = _config(images, labels, out)
    with pytest.raises(ValueError, match=match):
        list(run(SegmentationObjective(cfg), loop_config(cfg)))
    assert not (out / "last.pt").exists()


def test_match_label_files_by_stem(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    tifffile.imwrite(tmp_path / "i" / "a.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "l" / "a.tiff", np.zeros((8, 8), np.uint16))
    pairs = match_label_files([tmp_path / "i" / "a.tif"], tmp_path / "l")
    assert pairs[0][1].name == "a.tiff"


def test_mae_checkpoint_is_not_a_segmenter(tmp_path):
    from napari_mae.io.checkpoint import CheckpointError, save_checkpoint
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.models.mae import build_model

    path = save_checkpoint(tmp_path / "mae.pt", build_model("tiny-2d"))
    with pytest.raises(CheckpointError, match="without a segmentation decoder"):
        load_segmenter(path)


def test_3d_encoder_refused(pairs, tmp_path):
    cfg = _config(*pairs, tmp_path / "run", model="tiny-3d")
    with pytest.raises(ValueError, match="2D encoder"):
        list(run(SegmentationObjective(cfg), loop_config(cfg)))


def test_cli_train_labels_then_segment_with_it(pairs, tmp_path, capsys):
    import json

    from napari_mae.cli import main

    images, labels = pairs
    run_dir = tmp_path / "seg"
    code = main(["train", str(images), "--labels", str(labels), "--out", str(run_dir), "--model", "tiny-2d",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    assert (run_dir / "best.pt").is_file()
    out = tmp_path / "labels.tif"
    code = main(["segment", str(images / "n0.tif"), "--model", str(run_dir / "best.pt"), "--method", "learned",
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["method"] == "learned" and info["model"] == str(run_dir / "best.pt")
    assert tifffile.imread(out).shape == (96, 96)


def test_cli_train_labels_bad_folder_one_line(pairs, tmp_path, capsys):
    from napari_mae.cli import main

    images, labels = pairs
    (labels / "n2.tif").unlink()
    code = main(["train", str(images), "--labels", str(labels), "--out", str(tmp_path / "seg"), "--quiet"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n2.tif" in err[0]
    assert not (tmp_path / "seg" / "last.pt").exists()


def test_cli_segment_method_learned_refuses_an_mae(pairs, tmp_path, capsys):
    from napari_mae.cli import main

    images, _ = pairs
    code = main(["segment", str(images / "n0.tif"), "--model", "default-3d", "--method", "learned",
                 "--out", str(tmp_path / "l.tif"), "--quiet"])  # fmt: skip
    assert code != 0
    assert "segmentation" in capsys.readouterr().err
