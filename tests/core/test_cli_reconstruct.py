"""``napari-mae reconstruct`` (napari_mae.cli.reconstruct)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile
import torch

from napari_mae.cli import main
from napari_mae.io.checkpoint import save_checkpoint
from napari_mae.models.mae import PRESETS, build_model

SAMPLE_2D = "nuclei_2d/images/10ba6cbee4873b32.tif"
SAMPLE_3D = "nuclei_3d/image.tif"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_checkpoint(path, preset, image):
    """A checkpoint of ``preset`` after a few optimiser steps on crops of ``image``."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], depth=1, decoder_depth=1)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = config.img_size
    x = torch.from_numpy(image[tuple(slice(0, s) for s in size)].astype(np.float32) / 255.0)[None, None]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        pred, mask = model(x, generator=g)
        loss = model.loss(x, pred, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(path, model, training_state={"step": 3})


@pytest.mark.parametrize(("sample", "preset"), [(SAMPLE_2D, "tiny-2d"), (SAMPLE_3D, "tiny-3d")])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_reconstructs_sample_images(sample_data_dir, tmp_path, sample, preset, trained):
    path = sample_data_dir / sample
    if not path.is_file():
        pytest.skip(f"{path} not present")
    image = tifffile.imread(path)
    model = str(_trained_checkpoint(tmp_path / "m.pt", preset, image)) if trained else preset
    out = tmp_path / "out" / "recon.tif"
    argv = [
        "reconstruct",
        str(path),
        "--model",
        model,
        "--mask-ratio",
        "0.75",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    argv += ["--save-masked", str(tmp_path / "masked.tif"), "--save-error", str(tmp_path / "error.tif")]
    argv += ["--save-mask", str(tmp_path / "mask.tif"), "--quiet"]
    assert main(argv) == 0
    recon = tifffile.imread(out)
    mask = tifffile.imread(tmp_path / "mask.tif").astype(bool)
    assert recon.shape == image.shape and recon.dtype == np.float32
    assert 0.7 < mask.mean() < 0.8
    np.testing.assert_array_equal(recon[~mask], image[~mask])
    assert tifffile.imread(tmp_path / "masked.tif").dtype == image.dtype
    assert np.isfinite(tifffile.imread(tmp_path / "error.tif")).all()


def test_2d_synthetic_with_explicit_options(tmp_path, capsys):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((45, 70)) * 4000).astype(np.uint16))
    out = tmp_path / "r.tif"
    argv = ["reconstruct", str(path), "--model", "tiny-2d", "--out", str(out), "--strategy", "grid"]
    assert main([*argv, "--mask-ratio", "0.5", "--device", "cpu", "--batch-size", "2", "--quiet"]) == 0
    assert tifffile.imread(out).shape == (45, 70)
    assert "27 of 54 patches removed" in capsys.readouterr().err


def test_same_seed_same_output(tmp_path):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.tif"
        assert (
            main(
                ["reconstruct", str(path), "--model", "tiny-2d", "--seed", "3", "--out", str(out), "--quiet"]
            )
            == 0
        )
        outs.append(tifffile.imread(out))
    np.testing.assert_array_equal(*outs)


@pytest.mark.parametrize(
    ("shape", "extra", "message"),
    [
        ((9, 37, 53), ["--model", "tiny-2d"], "is a 2D model"),
        ((37, 53), ["--model", "tiny-2d", "--mask-ratio", "1"], "mask_ratio"),
        ((37, 53), ["--model", "nope.pt"], "no checkpoint file"),
        ((37, 53), ["--model", "tiny-2d", "--out", "x.png"], "only TIFF"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, shape, extra, message):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint8) + np.arange(shape[-1], dtype=np.uint8))
    argv = ["reconstruct", str(path), "--out", str(tmp_path / "r.tif"), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("napari-mae reconstruct: error:")


@pytest.mark.parametrize("name", ["rgb.tif", "rgb.png"])
def test_rgb_input_is_written_in_its_axis_order(tmp_path, name):
    """An RGB (Y, X, 3) input gives (Y, X, 3) RGB files, as the mask is (Y, X): not (3, Y, X)."""
    import imageio.v3 as iio

    from napari_mae.io.readers import read_image

    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    path = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        iio.imwrite(path, rgb)
    files = {key: tmp_path / f"{key}.tif" for key in ("out", "masked", "error", "mask")}
    argv = ["reconstruct", str(path), "--model", "tiny-2d", "--out", str(files["out"]), "--quiet"]
    argv += ["--save-masked", str(files["masked"]), "--save-error", str(files["error"])]
    assert main([*argv, "--save-mask", str(files["mask"])]) == 0
    for key in ("out", "masked", "error"):
        with tifffile.TiffFile(files[key]) as tif:
            assert tif.series[0].axes == "YXS" and tif.series[0].shape == (40, 56, 3), key
        data, _, meta = read_image(files[key])
        assert meta["axes"] == "YXC" and meta["rgb"], key
    mask = tifffile.imread(files["mask"]).astype(bool)
    assert mask.shape == (40, 56)
    np.testing.assert_array_equal(tifffile.imread(files["masked"])[mask], 0 * rgb[mask])
    np.testing.assert_array_equal(tifffile.imread(files["out"])[~mask], rgb[~mask])


def test_multichannel_input_keeps_its_channels_first(tmp_path):
    """A 2-channel (C, Y, X) TIFF is not RGB: its reconstruction stays (C, Y, X) on disk."""
    stack = (np.random.default_rng(1).random((2, 40, 56)) * 255).astype(np.uint8)
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "r.tif"
    assert main(["reconstruct", str(path), "--model", "tiny-2d", "--out", str(out), "--quiet"]) == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "CYX" and tif.series[0].shape == (2, 40, 56)
