"""The top-level help and ``python -m napari_mae``."""

from __future__ import annotations

import os
import subprocess
import sys

from napari_mae.cli import build_parser


def test_top_level_help_tells_the_two_train_tasks_and_finetune(capsys):
    text = " ".join(build_parser().format_help().split())
    assert (
        "train the masked autoencoder (unlabelled images) or the segmentation decoder (images + --labels)"
        in text
    )
    assert "few-stroke fine-tuning of the segmentation decoder" in text
    assert "pre-train or fine-tune a masked autoencoder" not in text


def test_python_dash_m_napari_mae_runs_the_cli():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "napari_mae", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("napari-mae ")
