"""Small CLI messages (options named, one check each) and refusals that come before the slow work."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from synthetic import five_nuclei

from napari_mae.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _files(tmp_path):
    """The five nuclei and strokes in them, as TIFFs; their paths."""
    img, _ = five_nuclei()
    s = np.zeros(img.shape, np.uint8)
    s[20, 16:25] = 2
    s[5, 5:40] = 1
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", s)
    return str(tmp_path / "img.tif"), str(tmp_path / "s.tif")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- messages


def test_finetune_existing_out_names_overwrite(tmp_path, capsys):
    img, s = _files(tmp_path)
    out = tmp_path / "tuned.pt"
    out.write_bytes(b"mine")
    assert main(["finetune", img, "--scribbles", s, "--out", str(out)]) == 2
    assert "exists" in (line := _one_line(capsys)) and "--overwrite" in line
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("command", ["segment", "finetune"])
def test_a_bundled_mae_as_segmentation_model_gets_the_mae_message(command, tmp_path, capsys):
    img, s = _files(tmp_path)
    out = str(tmp_path / ("l.tif" if command == "segment" else "m.pt"))
    argv = (
        ["segment", img, "--method", "learned"]
        if command == "segment"
        else ["finetune", img, "--scribbles", s]
    )
    assert main([*argv, "--model", "default-3d", "--out", out]) == 2
    line = _one_line(capsys)
    assert "default-3d is an MAE checkpoint without a segmentation decoder; train one with" in line


def test_segment_missing_scribbles_names_the_option(tmp_path, capsys):
    img, _ = _files(tmp_path)
    assert (
        main(["segment", img, "--scribbles", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "l.tif")])
        == 2
    )
    assert f"--scribbles {tmp_path / 'nope.tif'}: no such file" in _one_line(capsys)


def test_finetune_missing_scribbles_names_the_option(tmp_path, capsys):
    img, _ = _files(tmp_path)
    nope = str(tmp_path / "nope.tif")
    assert main(["finetune", img, "--scribbles", nope, "--out", str(tmp_path / "m.pt")]) == 2
    assert f"--scribbles {nope}: no such file" in _one_line(capsys)


def test_no_pseudo_labels_with_a_pseudo_source_is_refused(tmp_path, capsys):
    img, s = _files(tmp_path)
    argv = ["finetune", img, "--scribbles", s, "--out", str(tmp_path / "m.pt"), "--no-pseudo-labels"]
    assert main([*argv, "--pseudo-source", "classical"]) == 2
    assert "--no-pseudo-labels" in (line := _one_line(capsys)) and "--pseudo-source" in line


# ----------------------------------------------------------------------------- refusals before work


def _slow(*args, **kwargs):
    raise AssertionError("the slow step ran before the refusal")


def test_3d_mae_with_scribbles_on_a_2d_image_is_refused_before_preparing(monkeypatch):
    import napari_mae.segmentation.segment as segment

    img, _ = five_nuclei()
    s = np.zeros(img.shape, np.uint8)
    s[20, 16:25] = 2
    s[5, 5:40] = 1
    monkeypatch.setattr(segment, "bright_single_channel", _slow)
    with pytest.raises(ValueError, match="'default-3d' is a 3D MAE and the image is 2D"):
        segment.segment_instances(img, scribbles=s, model="default-3d")


def test_reconstruct_3d_model_on_a_2d_image_is_refused_before_masking(tmp_path, capsys, monkeypatch):
    import napari_mae.reconstruction as reconstruction

    img, _ = _files(tmp_path)
    monkeypatch.setattr(reconstruction, "make_mask", _slow)
    assert (
        main(["reconstruct", img, "--model", "default-3d", "--out", str(tmp_path / "r.tif"), "--quiet"]) == 2
    )
    assert "3D model" in (line := _one_line(capsys)) and "image is 2D" in line


def test_demo_non_empty_out_is_refused_before_the_demo_starts(tmp_path, capsys, monkeypatch):
    import napari_mae.demo as demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(demo, "run_demo", _slow)  # it imports torch before its own check
    assert main(["demo", "--out", str(out)]) == 2
    assert "not empty" in _one_line(capsys) and (out / "notes.txt").read_text() == "mine"


def test_train_into_an_existing_run_is_refused_before_the_data_is_prepared(tmp_path, capsys, monkeypatch):
    import napari_mae.training.data as data

    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", five_nuclei()[0])
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"a run")
    monkeypatch.setattr(data, "make_datasets", _slow)
    assert main(["train", str(folder), "--out", str(out), "--epochs", "1", "--model", "tiny-2d"]) == 2
    assert "already holds a training run" in _one_line(capsys)
    assert (out / "last.pt").read_bytes() == b"a run"


def test_load_segmenter_names_a_bundled_mae_without_decoder():
    """The Python API (and so the widgets) get the CLI's message for ``default-3d``, not
    "no segmentation model at default-3d" (the check is load_segmenter's)."""
    from napari_mae.io.checkpoint import CheckpointError
    from napari_mae.models.decoder import load_segmenter

    with pytest.raises(
        CheckpointError, match="default-3d is an MAE checkpoint without a segmentation decoder"
    ):
        load_segmenter("default-3d")
    assert load_segmenter("default-2d").spatial_dims == 2


def test_train_into_an_existing_run_is_refused_before_torch(tmp_path, capsys, monkeypatch):
    """The run folder is checked by the loop's own check before the data is read or torch
    is imported (it took seconds); the message is the loop's."""
    import napari_mae.cli.train as cli_train

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    monkeypatch.setattr(cli_train, "_run_mae", _slow)
    monkeypatch.setattr(cli_train, "_run_segmentation", _slow)
    assert main(["train", str(tmp_path), "--out", str(run)]) == 2
    assert "already holds a training run" in _one_line(capsys)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "cannot resume" in _one_line(capsys)


def test_extreme_anisotropy_is_refused_in_one_line(tmp_path, capsys):
    """`--spacing 1e-9 1 1` crashed allocating a 972 TiB filter bank; 0.001 ran 74 s."""
    import numpy as np
    import tifffile

    vol = tmp_path / "v.tif"
    tifffile.imwrite(vol, np.zeros((12, 16, 16), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    for sp in (["1e-9", "1", "1"], ["0.0001", "1", "1"]):
        assert main(["segment", str(vol), "--spacing", *sp, "--out", str(tmp_path / "l.tif")]) == 2
        assert "anisotropic" in _one_line(capsys)


def test_finetune_refuses_an_image_given_as_corrected_labels():
    import numpy as np
    from synthetic import five_nuclei

    from napari_mae.segmentation.finetune import check_finetune_inputs

    img, gt = five_nuclei()
    s = np.zeros(gt.shape, np.uint8)
    s[20, 16:25] = 2
    s[5, 5:40] = 1
    with pytest.raises(ValueError, match="label every pixel"):
        check_finetune_inputs([img], [s], [img.astype(np.int32) + 1])
    check_finetune_inputs([img], [s], [gt])  # instance labels pass


def test_ctrl_c_in_finetune_stops_and_keeps_the_best_model(tmp_path, capsys, monkeypatch):
    """Ctrl-C exited 130 and lost the run; now the first one sets fine-tuning's stop (it
    saves the best model so far), as in train, and a second would interrupt."""
    import os
    import signal
    import types

    import napari_mae.segmentation.finetune as ft

    img, s = _files(tmp_path)
    seen = {}

    def fake_finetune(images, scribbles, *, out, stop, **kw):
        yield types.SimpleNamespace(kind="step", step=1, loss=0.5, elapsed_s=0.1, message="", checkpoint=None)
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C during a step
        seen["stopped"] = stop.is_set()
        out.write_bytes(b"best")
        yield types.SimpleNamespace(kind="stopped", step=1, loss=0.5, elapsed_s=0.2,
                                    message=f"stopped; best model saved to {out}", checkpoint=out)  # fmt: skip

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, else Python's default
    out = tmp_path / "ft.pt"
    assert main(["finetune", img, "--scribbles", s, "--out", str(out)]) == 0
    assert seen["stopped"] and out.read_bytes() == b"best"
    assert "Ctrl-C: stopping after this step and saving the best model so far" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) == before  # restored
