"""Help texts that give units and scales, --encoder-blocks against the encoder, train's counts."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_mae.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _option_help(command: str, option: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    action = next(a for a in sub._actions if option in a.option_strings)
    return " ".join(action.help.split())


def test_threshold_help_gives_its_scale():
    text = _option_help("segment", "--threshold")
    assert "0-1 scale" in text and "99.8th percentiles" in text and "object probability" in text
    assert "learned method does not use it" in text


@pytest.mark.parametrize("command", ["segment", "finetune"])
def test_radius_help_says_physical_units_or_pixels(command):
    text = _option_help(command, "--radius")
    assert "physical units of the file" in text and "pixels where" in text


def test_finetune_config_checks_encoder_blocks_against_the_depth():
    from napari_mae.segmentation.finetune import FinetuneConfig

    FinetuneConfig(encoder_blocks=4).check_encoder(4)
    with pytest.raises(ValueError, match="more than the 4 transformer blocks"):
        FinetuneConfig(encoder_blocks=5).check_encoder(4)


def test_finetune_encoder_blocks_above_the_depth_is_one_line(tiny_model, tmp_path, capsys):
    gt = np.zeros((96, 96), np.int32)
    for k, c in enumerate([(20, 20), (46, 48), (70, 28)], start=1):
        gt[disk(c, 6, shape=gt.shape)] = k
    img = (20 + 150 * (gt > 0)).astype(np.uint8)
    strokes = np.zeros(gt.shape, np.uint8)
    strokes[20, 16:25] = 2
    strokes[5, 5:40] = 1
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", strokes)
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif"), "--out", str(out)]
    assert main([*args, "--model", str(tiny_model), "--encoder-blocks", "99", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder_blocks=99 is more than the 4 transformer blocks" in err[0]
    assert not out.exists()


def test_train_message_counts_training_and_validation_images(tmp_path, capsys):
    from skimage import data

    cell = data.cell()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"cell{i}.tif", cell[i * 120 : i * 120 + 48, i * 100 : i * 100 + 64])
    tiny = ["--model", "tiny-2d", "--img-size", "16", "--patch-size", "4", "--batch-size", "2", "--quiet"]
    assert main(["train", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", *tiny]) == 0
    assert "on 1 image for training and 1 for validation" in capsys.readouterr().err
