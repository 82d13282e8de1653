"""The native 3D decoder: trained from 3D labels on the tiny-3d encoder, run on volumes directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from napari_mae.models.decoder import DecoderConfig, InstanceDecoder, load_segmenter
from napari_mae.models.mae import build_model
from napari_mae.segmentation.learned import LearnedParams, instances_from_maps, median_radius, segment_learned
from napari_mae.segmentation.metrics import match_instances
from napari_mae.segmentation.targets import distance_targets
from napari_mae.training.loop import run
from napari_mae.training.objectives import loop_config
from napari_mae.training.segmentation import SegmentationConfig, SegmentationObjective, _rescaled_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _balls(seed, shape=(16, 40, 40), n=6, radius=5.0, spacing=(1.0, 1.0, 1.0)):
    """Blurred bright balls of ``radius`` physical units on a noisy background, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    grid = np.indices(shape).astype(float) * np.asarray(spacing, float)[:, None, None, None]
    extent = np.asarray(shape) * np.asarray(spacing)
    for i in range(1, n + 1):
        c = [rng.uniform(radius, e - radius) for e in extent]
        inside = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= radius**2
        labels[inside & (labels == 0)] = i
    image = ndi.gaussian_filter(200.0 * (labels > 0), 1.0) + rng.normal(20, 5, shape)
    return image.astype(np.float32), labels


def _folders(root: Path, volumes):
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for k, (img, lab) in enumerate(volumes):
        tifffile.imwrite(images / f"v{k}.tif", img)
        tifffile.imwrite(labels / f"v{k}.tif", lab)
    return images, labels


def _config(images, labels, out, **kw):
    base = dict(
        model="tiny-3d",
        features=4,
        crop_size_3d=16,
        object_radius=4.0,
        samples_per_image=2,
        epochs=1,
        batch_size=2,
        val_fraction=0.34,
        device="cpu",
        checkpoint_every=0,
        seed=0,
    )
    return SegmentationConfig(images, labels, out, **{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-3d decoder trained for 2 steps on 3 synthetic volumes (and its folders)."""
    root = tmp_path_factory.mktemp("native3d")
    images, labels = _folders(root, [_balls(k) for k in range(3)])
    cfg = _config(images, labels, root / "run")
    updates = list(run(SegmentationObjective(cfg), loop_config(cfg)))
    return root, images, labels, updates


@pytest.mark.parametrize(
    ("patch", "size"),
    [
        ((4, 8, 8), (16, 32, 32)),
        ((4, 8, 8), (8, 16, 24)),
        ((2, 8, 8), (6, 16, 16)),
        ((8, 8, 8), (16, 16, 32)),
    ],
)
def test_decoder_3d_shapes_with_anisotropic_patches(patch, size):
    mae = build_model("tiny-3d", patch_size=patch, img_size=tuple(max(s, 2 * p) for s, p in zip(size, patch)))
    net = InstanceDecoder(mae, DecoderConfig(features=4))
    with torch.no_grad():
        y = net(torch.rand(1, 1, *size))
    assert y.shape == (1, 3, *size)
    assert float(y[:, 1:].min()) >= 0 and float(y[:, 1:].max()) <= 1


@pytest.mark.parametrize("patch", [(8, 4, 4), (4, 8, 16), (3, 8, 8), (4, 4, 4)])
def test_decoder_3d_bad_patch(patch):
    with pytest.raises(ValueError, match="patch_size"):
        InstanceDecoder(build_model("tiny-3d", patch_size=patch, img_size=(16, 64, 64)))


def test_perfect_3d_maps_recover_the_labels():
    """The 3D watershed of the targets themselves finds every ball, touching ones apart."""
    _, labels = _balls(3, shape=(24, 40, 40), n=8, radius=5.0)
    maps = distance_targets(labels)
    assert maps.shape == (3, *labels.shape)
    pred = instances_from_maps(maps, LearnedParams(sigma_distance=0.0, sigma_foreground=0.0))
    m = match_instances(labels, pred, iou_threshold=0.5)
    assert m["fp"] == 0 and m["fn"] == 0 and m["tp"] == len(np.unique(labels)) - 1


def test_training_grid_is_isotropic_at_the_decoder_radius():
    """Anisotropic voxels (Z 2x): the volume is resampled so that objects have object_radius voxels
    on every axis."""
    image, labels = _balls(1, shape=(12, 48, 48), n=5, radius=8.0, spacing=(2.0, 1.0, 1.0))
    img, lab, grid = _rescaled_volume(image, labels.astype(np.int32), 4.0, (2.0, 1.0, 1.0))
    assert img.shape == lab.shape
    assert grid == pytest.approx((grid[1],) * 3, rel=0.05)  # isotropic voxels
    assert median_radius(lab) == pytest.approx(4.0, rel=0.15)
    assert grid[1] == pytest.approx(2.0, rel=0.15)  # 8 units / 4 voxels


def test_trains_and_saves_a_loadable_3d_checkpoint(trained):
    from napari_mae.io.checkpoint import load_checkpoint

    root, _, _, updates = trained
    assert updates[-1].kind == "finished", updates[-1].message
    epoch = [u for u in updates if u.kind == "epoch"]
    assert len(epoch) == 1 and 0.0 <= epoch[0].metrics["val_acc50"] <= 1.0
    assert "isotropic" in updates[0].message
    ckpt = load_checkpoint(root / "run" / "best.pt")
    assert ckpt["config"]["task"] == "segmentation" and ckpt["config"]["decoder"]["object_radius"] == 4.0
    net = load_segmenter(root / "run" / "best.pt")
    assert net.spatial_dims == 3 and net.decoder_config.object_radius == 4.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_3d_model_segments_volumes_of_any_shape(trained, spacing):
    from napari_mae.segmentation import segment_instances

    root = trained[0]
    image, _ = _balls(7, shape=(20, 36, 42), spacing=spacing)
    labels, info = segment_instances(image, method="learned", model=root / "run" / "best.pt", spacing=spacing)
    assert labels.shape == image.shape and labels.dtype == np.uint32
    assert info["decoder"] == "3d" and info["method"] == "learned" and info["radius_planes"] is None
    # the working grid is isotropic: Z resampled twice as much as Y and X where voxels are 2x deeper
    assert info["scale"][0] / info["scale"][1] == pytest.approx(spacing[0] / spacing[1], rel=0.1)


def test_2d_model_on_a_volume_says_planes():
    torch.manual_seed(0)
    net = InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4)).eval()
    vol = np.random.default_rng(1).random((10, 16, 16)).astype(np.float32)
    _, info = segment_learned(vol, net, 8.0, spacing=(1.0, 1.0, 1.0), radius=8.0, radius_from_planes=False)
    assert info["decoder"] == "planes"
    _, info2 = segment_learned(vol[0], net, 8.0, spacing=(1.0, 1.0), radius=8.0)
    assert info2["decoder"] == "2d"


def test_3d_model_on_a_2d_image(trained):
    """method="learned" refuses; "auto" falls back to the classical pipeline."""
    from napari_mae.segmentation import segment_instances

    ckpt = trained[0] / "run" / "best.pt"
    image = _balls(2)[0][8]
    with pytest.raises(ValueError, match="3D segmentation model and the image is 2D"):
        segment_instances(image, method="learned", model=ckpt)
    labels, info = segment_instances(image, method="auto", model=ckpt)
    assert info["method"] == "classical" and labels.shape == image.shape


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("2d_labels_3d_encoder", r"v1\.tif: the labels are 2D and the encoder is 3D.*2D encoder"),
        ("3d_labels_2d_encoder", r"v[01]\.tif: the labels are 3D and the encoder is 2D.*3D encoder"),
        ("shape", r"v1\.tif: shape \(16, 40, 30\) does not match"),
        ("crop", "crop_size_3d=20 must be a multiple"),
        ("small_crop", "crop_size_3d=8 must be >= 16"),
    ],
)
def test_bad_3d_input_named_and_nothing_written(tmp_path, case, match):
    vols = [_balls(k) for k in range(2)]
    kw = {}
    if case == "2d_labels_3d_encoder":
        vols[1] = (vols[1][0][8], vols[1][1][8])  # one plane
    elif case == "3d_labels_2d_encoder":
        kw["model"] = "tiny-2d"
    elif case == "shape":
        vols[1] = (vols[1][0], vols[1][1][:, :, :30])
    elif case == "crop":
        kw["crop_size_3d"] = 20
    elif case == "small_crop":
        kw["crop_size_3d"] = 8
    images, labels = _folders(tmp_path, vols)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        cfg = _config(images, labels, out, **kw)
        list(run(SegmentationObjective(cfg), loop_config(cfg)))
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize(("extra", "model"), [([], "default-3d"), (["--model", "tiny-3d"], "tiny-3d")])
def test_cli_trains_a_3d_decoder_on_volumes(trained, tmp_path, capsys, monkeypatch, extra, model):
    from napari_mae.cli import main
    from napari_mae.training import segmentation

    _, images, labels, _ = trained
    configs = []
    monkeypatch.setattr(
        segmentation, "train_segmentation", lambda config, **kw: configs.append(config) or iter(())
    )
    code = main(["train", str(images), "--labels", str(labels), "--out", str(tmp_path / "r"), *extra])
    assert code == 0 and configs[0].model == model
    assert ("v0.tif is a 3D volume" in capsys.readouterr().err) == (not extra)
