"""Tests of napari_mae.training: a short real run, exact stop/resume, non-finite loss."""

from __future__ import annotations

import csv
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_mae import training
from napari_mae.models.mae import MAEConfig
from napari_mae.training import TrainConfig, loop, lr_at_step, train

# A very small MAE: 16x16 crops, 16 patches of 4x4, one block each side.
TINY = MAEConfig(
    img_size=(16, 16),
    patch_size=(4, 4),
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def write_real_images(folder: Path) -> Path:
    """Six small real microscopy crops (scikit-image's bundled ``cell``) as TIFFs."""
    from skimage import data

    cell = data.cell()  # (660, 550) uint8
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        tifffile.imwrite(folder / f"cell{i}.tif", cell[i * 100 : i * 100 + 40, 50 + i * 60 : 110 + i * 60])
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_real_images(tmp_path / "images")


def _config(image_folder, out, **kw) -> TrainConfig:
    base = {
        "data_dir": image_folder,
        "output_dir": out,
        "model": TINY,
        "epochs": 2,
        "batch_size": 2,
        "val_fraction": 0.2,
        "checkpoint_every": 2,
        "seed": 7,
        "lr": 2e-3,
    }
    base.update(kw)
    return TrainConfig(**base)


def _read_log(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _state(path: Path) -> dict:
    from napari_mae.models.mae import load_model

    return load_model(str(path)).state_dict()


def test_two_epoch_run_writes_checkpoints_and_log(image_folder, tmp_path):
    out = tmp_path / "run"
    updates = list(train(_config(image_folder, out)))
    kinds = [u.kind for u in updates]
    # 5 training files, batch 2 -> 3 steps per epoch
    assert kinds == ["start"] + ["step"] * 3 + ["epoch"] + ["step"] * 3 + ["epoch", "finished"]
    assert "5 images for training and 1 for validation" in updates[0].message
    steps = [u for u in updates if u.kind == "step"]
    assert [u.step for u in steps] == list(range(1, 7))
    assert all(
        u.n_steps == 6 and u.n_epochs == 2 and math.isfinite(u.loss) and u.images_per_s > 0 for u in steps
    )
    assert [u.epoch for u in steps] == [1, 1, 1, 2, 2, 2]
    assert steps[-1].eta_s == pytest.approx(0.0)
    epochs = [u for u in updates if u.kind == "epoch"]
    assert all(u.val_loss is not None and math.isfinite(u.val_loss) for u in epochs)
    # schedule: warm-up is 0 steps of 6 -> cosine from the peak
    assert [u.lr for u in steps] == pytest.approx([lr_at_step(s, 6, lr=2e-3) for s in range(6)])

    for name in ("last.pt", "best.pt", "loss_log.csv", "config.json"):
        assert (out / name).is_file(), name
    rows = _read_log(out / "loss_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [bool(r["val_loss"]) for r in rows] == [False, False, True, False, False, True]
    assert float(rows[2]["val_loss"]) == pytest.approx(epochs[0].val_loss, rel=1e-4)

    from napari_mae.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["training_state"]["step"] == 6
    # the checkpoint is a normal model checkpoint too
    state = _state(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_stop_and_resume_equals_uninterrupted(image_folder, tmp_path):
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    kw = {"epochs": 3, "checkpoint_every": 0}
    list(train(_config(image_folder, ref_out, **kw)))

    stop = threading.Event()
    kinds = []
    for u in train(_config(image_folder, cut_out, **kw), stop=stop):
        kinds.append(u.kind)
        if u.kind == "step" and u.step == 4:  # mid-way through epoch 2
            stop.set()
    assert kinds[-1] == "stopped"
    from napari_mae.io.checkpoint import load_checkpoint

    assert load_checkpoint(cut_out / "last.pt")["training_state"]["step"] == 4

    resumed = list(train(_config(image_folder, cut_out, resume=True, **kw)))
    assert resumed[0].kind == "start" and "resuming" in resumed[0].message
    assert resumed[1].step == 5 and resumed[-1].kind == "finished"

    ref, cut = _state(ref_out / "last.pt"), _state(cut_out / "last.pt")
    assert ref.keys() == cut.keys()
    for k in ref:
        assert torch.equal(ref[k], cut[k]), k
    ref_rows, cut_rows = _read_log(ref_out / "loss_log.csv"), _read_log(cut_out / "loss_log.csv")
    assert [(r["step"], r["loss"], r["val_loss"], r["lr"]) for r in ref_rows] == [
        (r["step"], r["loss"], r["val_loss"], r["lr"]) for r in cut_rows
    ]

    with pytest.raises(ValueError, match="already finished"):
        list(train(_config(image_folder, cut_out, resume=True, **kw)))


def test_callable_stop_before_first_step(image_folder, tmp_path):
    updates = list(train(_config(image_folder, tmp_path / "run"), stop=lambda: True))
    assert [u.kind for u in updates] == ["start", "stopped"]
    assert (tmp_path / "run" / "last.pt").is_file()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    from napari_mae.training import objectives

    real = objectives._forward_loss
    calls = {"n": 0}

    def flaky(net, model, x, *args):
        calls["n"] += 1
        loss = real(net, model, x, *args)
        return loss * float("nan") if calls["n"] == 3 else loss  # 3rd training step

    monkeypatch.setattr(objectives, "_forward_loss", flaky)
    out = tmp_path / "run"
    updates = list(train(_config(image_folder, out, checkpoint_every=2)))
    assert updates[-1].kind == "failed"
    assert "became nan at step 3" in updates[-1].message and "last.pt" in updates[-1].message
    from napari_mae.io.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.pt")["training_state"]["step"] == 2
    assert len(_read_log(out / "loss_log.csv")) == 2


@pytest.mark.parametrize(
    ("step", "total", "warmup", "expected"),
    [
        (0, 100, 10, 0.1),  # warm-up starts at lr / warmup
        (9, 100, 10, 1.0),
        (10, 100, 10, 1.0),  # cosine starts at the peak
        (55, 100, 10, 0.5),  # half way through the cosine
        (100, 100, 10, 0.0),
        (0, 10, 0, 1.0),
    ],
)
def test_lr_schedule(step, total, warmup, expected):
    assert lr_at_step(step, total, lr=1.0, warmup_steps=warmup) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"mask_ratio": 1.0},
        {"lr": 0.0},
        {"min_lr": 1.0},
        {"warmup_fraction": 1.0},
        {"grad_clip": 0.0},
        {"val_fraction": 1.0},
        {"spatial_dims": 4},
        {"cache": "ram"},
    ],
)
def test_bad_config_raises(tmp_path, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        list(train(_config(tmp_path, tmp_path / "run", **bad)))


def test_setup_errors(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        list(train(_config(image_folder, tmp_path / "run", resume=True)))
    with pytest.raises(ValueError, match="spatial_dims=3"):
        list(train(_config(image_folder, tmp_path / "run", spatial_dims=3)))
    with pytest.raises(FileNotFoundError):
        list(train(_config(tmp_path / "missing", tmp_path / "run")))
    with pytest.raises(ValueError, match="only be changed for a preset"):
        list(train(_config(image_folder, tmp_path / "run", model="default-2d", patch_size=(4, 4))))


def test_weight_decay_groups():
    from napari_mae.models.mae import build_model

    groups = loop.decay_groups(build_model(TINY), 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert decayed.isdisjoint(id(p) for p in groups[1]["params"])


def test_rng_state_round_trip():
    state = loop._rng_state()
    a = (torch.rand(3), np.random.rand(3))
    loop._set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_3d_run_on_a_volume(tmp_path):
    """A 3D model trains on 3D crops of a real volume (a stack of real 2D crops)."""
    from skimage import data

    folder = tmp_path / "vols"
    folder.mkdir()
    cell = data.cell()
    tifffile.imwrite(folder / "vol.tif", np.stack([cell[i * 10 : i * 10 + 40, :40] for i in range(10)]))
    tiny3d = MAEConfig(
        img_size=(8, 16, 16),
        patch_size=(4, 8, 8),
        embed_dim=24,
        depth=1,
        num_heads=2,
        decoder_embed_dim=12,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    updates = list(train(_config(folder, tmp_path / "run", model=tiny3d, epochs=1, samples_per_image=4)))
    assert updates[-1].kind == "finished" and updates[-1].step == 2
    assert "3D, crops (8, 16, 16)" in updates[0].message


# ----------------------------------------------------------- default model (CLI and widget)


@pytest.mark.parametrize(
    ("spatial_dims", "expected"), [(None, "default-2d"), (2, "default-2d"), (3, "default-3d")]
)
def test_default_model_is_the_bundled_one(spatial_dims, expected):
    assert training.default_model(spatial_dims) == expected
    assert training.bundled_model_available(expected)  # shipped in src/napari_mae/models


@pytest.mark.parametrize("spatial_dims", [1, 4, "3"])
def test_default_model_bad_dims(spatial_dims):
    with pytest.raises(ValueError, match="spatial_dims"):
        training.default_model(spatial_dims)


def test_bundled_model_available_only_for_bundled_names():
    assert not training.bundled_model_available("tiny-2d")
    assert not training.bundled_model_available("../models/default-2d")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.tif": "2d"}, 2),
        ({"a.tif": "3d"}, 3),
        ({"z.tif": "2d", "labels/a.tif": "3d"}, 2),  # annotation files are left out, as in training
        ({}, None),  # nothing found: training reports it itself
        ({"a.tif": "bad"}, None),  # unreadable
    ],
)
def test_guess_spatial_dims(tmp_path, sample_data_dir, files, expected):
    image_2d = sorted((sample_data_dir / "nuclei_2d" / "images").glob("*.tif"))[0]
    sources = {"2d": image_2d, "3d": sample_data_dir / "nuclei_3d" / "image.tif"}
    for name, kind in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image" if kind == "bad" else sources[kind].read_bytes())
    guess = training.guess_spatial_dims(tmp_path, ["*.tif"])
    assert (guess[0] if guess else None) == expected
    if guess:
        assert guess[1] == (tmp_path / min(f for f in files if "/" not in f)).resolve()
