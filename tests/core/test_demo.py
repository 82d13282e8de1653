"""The demo runs end to end on the bundled 2D sample and writes what it promises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_mae.cli import main


@pytest.mark.slow
def test_demo_2d_sample(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--samples", "nuclei_2d", "--finetune-epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["samples"]["nuclei_2d"]
    rec = entry["reconstruction"]
    # The MAE must beat filling removed patches with the visible mean.
    assert rec["nrmse_masked"] < rec["nrmse_masked_mean_fill"]
    assert entry["segmentation"]["learned"]["info"]["method"] == "learned"
    assert entry["segmentation"]["auto"]["info"]["method"] == "classical"
    for mode in ("auto", "learned", "scribbles"):
        scores = entry["segmentation"][mode]["scores"]
        assert 0.0 <= scores["accuracy"] <= 1.0
        assert scores["n_pred"] > 0
        labels = tifffile.imread(out / f"nuclei_2d_labels_{mode}.tif")
        assert labels.shape == (520, 696)
        assert len(np.unique(labels)) - 1 == scores["n_pred"]
    assert entry["segmentation"]["scribbles"]["scribbled_fraction"] <= 0.02
    assert (out / "nuclei_2d.png").stat().st_size > 10_000
    assert (out / "finetune_loss.png").is_file()
    ft = metrics["finetune"]
    assert len(ft["epoch_loss"]) == 1 and np.isfinite(ft["epoch_loss"][0])


def test_demo_rejects_unknown_sample(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--samples", "nope"])
