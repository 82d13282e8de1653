"""PNG and JPEG through the one reader: read_image, MONAI pipelines and every command."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from synthetic import five_nuclei

from napari_mae.cli import main
from napari_mae.io.readers import ImageReadError, monai_readers, read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rgb(img):
    return np.stack([img, (img * 0.5).astype(np.uint8), (img * 0.8).astype(np.uint8)], axis=-1)


# ----------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg"])
def test_grey_png_and_jpeg_read_without_spacing(tmp_path, suffix):
    img, _ = five_nuclei()
    path = tmp_path / f"grey{suffix}"
    iio.imwrite(path, img)
    data, spacing, meta = read_image(path)
    assert data.shape == img.shape and data.dtype == np.uint8
    assert meta["axes"] == "YX" and not meta["rgb"] and meta["unit"] == "pixel"
    assert spacing == (1.0, 1.0)
    if suffix == ".png":  # lossless
        np.testing.assert_array_equal(data, img)


def test_rgb_png_reads_as_an_rgb_tiff_does(tmp_path):
    rgb = _rgb(five_nuclei()[0])
    iio.imwrite(tmp_path / "rgb.png", rgb)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    png, png_spacing, png_meta = read_image(tmp_path / "rgb.png")
    tif, tif_spacing, tif_meta = read_image(tmp_path / "rgb.tif")
    np.testing.assert_array_equal(png, tif)
    assert png_spacing == tif_spacing
    for key in ("axes", "rgb", "unit"):
        assert png_meta[key] == tif_meta[key]


def test_palette_and_16_bit_png(tmp_path):
    rgb = _rgb(five_nuclei()[0])
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    data, _, meta = read_image(tmp_path / "p.png")
    assert data.shape == rgb.shape and meta["rgb"]  # the colours, not the palette indices
    deep = (np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7) % 60000
    iio.imwrite(tmp_path / "deep.png", deep)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png")[0], deep)


def test_corrupt_png_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="broken.png") as err:
        read_image(path)
    assert "\n" not in str(err.value)


def test_monai_pipeline_reads_png_through_the_same_reader(tmp_path):
    """Training (MONAI LoadImaged) gets a palette PNG's colours in numpy order, as for the TIFF."""
    from napari_mae.training.data import FinishItemd, LoadWithReadersd

    rgb = _rgb(five_nuclei()[0])[:, :80]  # not square: a transposed read shows
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    colours = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    tifffile.imwrite(tmp_path / "p.tif", colours, photometric="rgb")
    out = {}
    for name in ("p.png", "p.tif"):
        load = LoadWithReadersd(["image"], image_only=True, ensure_channel_first=True)
        item = FinishItemd(["image"], spatial_dims=2, in_channels=3)(load({"image": str(tmp_path / name)}))
        out[name] = item["image"]
    assert tuple(out["p.png"].shape) == (3, 96, 80)
    torch.testing.assert_close(out["p.png"], out["p.tif"])
    assert type(monai_readers()[0]).__name__ == "TifffileReader"


# ----------------------------------------------------------------------------- commands


def test_segment_rgb_png_as_its_rgb_tiff(tmp_path, capsys):
    rgb = _rgb(five_nuclei()[0])
    iio.imwrite(tmp_path / "rgb.png", rgb)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    infos = {}
    for name in ("rgb.png", "rgb.tif"):
        assert (
            main(["segment", str(tmp_path / name), "--out", str(tmp_path / f"{name}.labels.tif"), "--quiet"])
            == 0
        )
        infos[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "rgb.png.labels.tif"), tifffile.imread(tmp_path / "rgb.tif.labels.tif")
    )
    assert infos["rgb.png"]["n_objects"] == infos["rgb.tif"]["n_objects"] == 5


def test_batch_segment_includes_png_and_jpeg(tmp_path, capsys):
    img, _ = five_nuclei()
    src = tmp_path / "src"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    iio.imwrite(src / "b.png", img)
    iio.imwrite(src / "c.jpg", img)
    assert main(["segment", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == 3 and summary["segmented"] == 3 and not summary["failed"]
    assert {p.name for p in (tmp_path / "out").glob("*_labels.tif")} == {
        "a_labels.tif",
        "b_labels.tif",
        "c_labels.tif",
    }


def test_reconstruct_png(tmp_path):
    img, _ = five_nuclei()
    iio.imwrite(tmp_path / "img.png", img)
    out = tmp_path / "r.tif"
    assert (
        main(["reconstruct", str(tmp_path / "img.png"), "--model", "tiny-2d", "--out", str(out), "--quiet"])
        == 0
    )
    assert tifffile.imread(out).shape == img.shape


def test_finetune_png_with_png_scribbles(tiny_model, tmp_path, capsys):
    img, gt = five_nuclei()
    strokes = np.zeros(gt.shape, np.uint8)
    strokes[20, 16:25] = 2
    strokes[46, 44:53] = 2
    strokes[5, 5:40] = 1
    strokes[90, 40:90] = 1
    iio.imwrite(tmp_path / "img.png", img)
    iio.imwrite(tmp_path / "s.png", strokes)
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(tmp_path / "img.png"), "--scribbles", str(tmp_path / "s.png"), "--out", str(out)]
    assert (
        main([*args, "--model", str(tiny_model), "--steps", "2", "--seconds", "120", "--device", "cpu"]) == 0
    )
    assert out.is_file()


def test_evaluate_reads_png_ground_truth(tmp_path, capsys):
    _, gt = five_nuclei()
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    iio.imwrite(tmp_path / "gt" / "a.png", gt.astype(np.uint8))
    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", gt.astype(np.uint32))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    assert "accuracy 1.000" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_write_tiff_rgb_keeps_samples_last_and_spacing(tmp_path, dtype):
    from napari_mae.io.writers import write_tiff

    rgb = (np.random.default_rng(2).random((3, 12, 20)) * 200).astype(dtype)  # channels first in memory
    path = write_tiff(tmp_path / "rgb.tif", rgb, spacing=(0.5, 0.25), unit="um", channel_axis=0, rgb=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "YXS"
    data, spacing, meta = read_image(path)
    np.testing.assert_array_equal(data, np.moveaxis(rgb, 0, -1))
    assert meta["rgb"] and spacing == pytest.approx((0.5, 0.25)) and meta["unit"] == "um"
    two = write_tiff(tmp_path / "two.tif", rgb[:2], channel_axis=0, rgb=True)  # 2 channels: not RGB
    with tifffile.TiffFile(two) as tif:
        assert tif.series[0].axes == "CYX"
