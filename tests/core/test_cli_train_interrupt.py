"""Issue 12.16: Ctrl-C in ``napari-mae train`` saves last.pt and says how to resume; one set of defaults."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import tifffile

from napari_mae.cli import main
from napari_mae.cli import train as cli_train


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


def _ctrl_c_once_training(out: Path, timeout: float = 300.0) -> threading.Thread:
    """Send this process one SIGINT (Ctrl-C) once the run has logged a step."""

    def send() -> None:
        log = out / "loss_log.csv"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:  # header + one step
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_saves_last_and_prints_the_resume_command(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    # Many epochs and no periodic checkpoint: only the stop after Ctrl-C can write last.pt.
    args = ["train", str(image_folder), "--out", str(out), "--epochs", "5000", "--checkpoint-every", "0"]
    args += ["--model", "tiny-2d", "--img-size", "16", "--patch-size", "4", "--batch-size", "2", "--quiet"]
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    sender = _ctrl_c_once_training(out)
    code = main(args)
    sender.join(timeout=5)
    err = capsys.readouterr().err
    assert code == 130, err
    assert (out / "last.pt").is_file()
    line = next(ln for ln in err.splitlines() if ln.startswith("Interrupted"))
    assert f"saved {out / 'last.pt'}" in line and "rerun with --resume" in line
    assert line.rstrip().endswith("--resume") and str(out) in line.split("continue:")[1]
    # The caller's SIGINT handler is back once training ended.
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_command_is_the_users_own_with_resume(monkeypatch):
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    argv = ["train", "imgs", "--out", "my run", "--epochs", "7", "--overwrite"]
    monkeypatch.setattr("sys.argv", ["napari-mae", *argv])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    command = cli_train._resume_command(parser.parse_args(argv))
    assert command == "napari-mae train imgs --out 'my run' --epochs 7 --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_train._resume_command(parser.parse_args(argv)).startswith(
        "torchrun --nproc_per_node 2 -m napari_mae.cli train imgs"
    )


def test_cli_defaults_are_each_tasks_config_defaults(tmp_path):
    """With --labels the CLI used the MAE's lr and crops per image; now each task its config's."""
    from napari_mae.training import TrainConfig
    from napari_mae.training.segmentation import SegmentationConfig

    seen = {}
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    base = ["train", str(tmp_path), "--out", str(tmp_path / "r")]
    for extra, cls, fn in (
        ([], TrainConfig, "train"),
        (["--labels", str(tmp_path)], SegmentationConfig, "train_segmentation"),
    ):
        args = parser.parse_args(base + extra)
        reference = cls(tmp_path, tmp_path, "x") if cls is SegmentationConfig else cls(tmp_path, "x")
        for key in ("epochs", "batch_size", "lr", "samples_per_image", "val_fraction"):
            value = getattr(args, key)
            seen[(fn, key)] = getattr(reference, key) if value is None else value
            assert seen[(fn, key)] == getattr(reference, key), (fn, key)
    assert seen[("train_segmentation", "lr")] != seen[("train", "lr")]  # the tasks differ: 2e-3 vs 1e-3
