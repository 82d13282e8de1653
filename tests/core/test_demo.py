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
    assert entry["segmentation"]["classical"]["info"]["method"] == "classical"
    # auto: the bundled decoder on a 2D image (the sample is of the kind it was trained on)
    assert entry["segmentation"]["auto"]["info"]["method"] == "learned"
    for mode in ("auto", "classical", "learned", "scribbles"):
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


def _fake_demo_folder(out):
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "nuclei_2d.png").write_bytes(b"png")
    (out / "ct_abdomen_labels_scribbles.tif").write_bytes(b"tif")
    (out / "finetune").mkdir()
    (out / "finetune" / "last.pt").write_bytes(b"ckpt")
    (out / "notes.txt").write_text("mine")


def test_demo_refuses_a_non_empty_out_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    _fake_demo_folder(out)
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["demo", "--out", str(out), "--samples", "nuclei_2d"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert (out / "metrics.json").read_text() == "{}"


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "demo"
    out.write_text("x")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err


def test_demo_bad_settings_leave_no_folder(tmp_path, capsys):
    for argv in (["--mask-ratio", "1"], ["--finetune-epochs", "-1"]):
        out = tmp_path / "demo"
        assert main(["demo", "--out", str(out), *argv]) == 2
        assert not out.exists(), argv


def test_overwrite_replaces_the_demos_own_outputs_only(tmp_path):
    from napari_mae.demo import prepare_output

    out = tmp_path / "demo"
    _fake_demo_folder(out)
    prepare_output(out, overwrite=True)
    # the old fine-tuning run is gone (a rerun would otherwise stop at "already holds a training run")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_output(out)  # only a non-demo file left: still not empty, refused without --overwrite
    assert (out / "notes.txt").is_file()


def test_demo_cli_passes_overwrite(tmp_path, monkeypatch):
    import napari_mae.demo as demo

    seen = {}

    def fake_run_demo(out, **kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path / "d"), "--overwrite"]) == 0
    assert seen["overwrite"] is True
