"""Single-file outputs of ``segment`` and ``reconstruct`` are not replaced without --overwrite."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_mae.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def image(tmp_path):
    img = np.full((64, 64), 20, np.uint8)
    for c in [(16, 16), (40, 44)]:
        img[disk(c, 6, shape=img.shape)] = 200
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(
    "command",
    [
        ["segment", "{img}", "--out", "{old}"],
        ["reconstruct", "{img}", "--model", "tiny-2d", "--out", "{old}"],
        ["reconstruct", "{img}", "--model", "tiny-2d", "--out", "{new}", "--save-error", "{old}"],
    ],
    ids=["segment", "reconstruct", "reconstruct-save-error"],
)
def test_an_existing_output_is_refused_unless_overwrite(tmp_path, image, capsys, command):
    old = tmp_path / "old.tif"
    old.write_bytes(b"keep me")
    argv = [a.format(img=image, old=old, new=tmp_path / "new.tif") for a in [*command, "--quiet"]]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "exists" in line and "--overwrite" in line
    assert old.read_bytes() == b"keep me" and not (tmp_path / "new.tif").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert tifffile.imread(old).shape == (64, 64)


def test_overwrite_never_replaces_the_input(tmp_path, image, capsys):
    before = image.read_bytes()
    argv = ["reconstruct", str(image), "--model", "tiny-2d", "--out", str(image), "--overwrite", "--quiet"]
    assert main(argv) == 2
    assert "same file" in _one_error_line(capsys)
    assert image.read_bytes() == before


def test_a_folder_as_out_is_refused(tmp_path, image, capsys):
    (tmp_path / "d.tif").mkdir()
    assert main(["segment", str(image), "--out", str(tmp_path / "d.tif"), "--overwrite", "--quiet"]) == 2
    assert "is a folder" in _one_error_line(capsys)
