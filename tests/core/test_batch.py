"""Folder mode (napari_mae.batch, ``napari-mae segment DIR --out OUTDIR``) and the CLI's
OME-Zarr mode, on tiny images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_mae.batch import list_images, output_name, segment_folder
from napari_mae.cli import main


def _nuclei(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gt = np.zeros((80, 80), np.uint16)
    for k in range(n):
        gt[disk((14 + 25 * (k // 3), 14 + 25 * (k % 3)), 6, shape=gt.shape)] = k + 1
    return (20 + 150 * (gt > 0) + rng.normal(0, 5, gt.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for k, n in enumerate((3, 5, 6)):
        tifffile.imwrite(
            src / f"img{k}.tif", _nuclei(n, k), imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"}
        )
    (src / "broken.tif").write_bytes(b"not a tiff")
    (src / "notes.txt").write_text("not an image")
    return src


def test_list_images_and_names(folder):
    names = [p.name for p in list_images(folder)]
    assert names == ["broken.tif", "img0.tif", "img1.tif", "img2.tif"]
    assert [p.name for p in list_images(str(folder / "img*.tif"))] == ["img0.tif", "img1.tif", "img2.tif"]
    assert output_name(folder / "a.nii.gz") == "a_labels" and output_name(folder / "b.ome.tif") == "b_labels"
    with pytest.raises(FileNotFoundError):
        list_images(folder / "missing")


def test_segment_folder_labels_csv_failure_and_resume(folder, tmp_path):
    out = tmp_path / "out"
    ups = list(segment_folder(folder, out))
    status = {u.path.name: u.status for u in ups}
    assert status == {"broken.tif": "failed", "img0.tif": "done", "img1.tif": "done", "img2.tif": "done"}
    assert "broken.tif" in str(ups[0].path) and ups[0].error  # reported, the rest went on
    assert [u.n_objects for u in ups[1:]] == [3, 5, 6]
    labels = tifffile.imread(out / "img1_labels.tif")
    assert labels.shape == (80, 80) and labels.max() == 5
    with open(out / "objects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 14 and {"file", "label", "area", "centroid_y", "mean_intensity"} <= set(rows[0])
    area = float(rows[0]["area"])  # um^2 at 0.5 um pixels: pixels / 4
    assert area == pytest.approx(float(rows[0]["pixels"]) * 0.25)
    # Existing output refused; resume skips the three done (and retries the broken file).
    with pytest.raises(FileExistsError, match="--resume"):
        list(segment_folder(folder, out))
    again = list(segment_folder(folder, out, resume=True))
    assert [u.status for u in again] == ["failed", "skipped", "skipped", "skipped"]
    with open(out / "objects.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 14


def test_stopping_between_files_keeps_the_table(folder, tmp_path):
    out = tmp_path / "out"
    gen = segment_folder(folder, out)
    next(gen), next(gen)  # broken, img0
    gen.close()  # what Stop / Ctrl-C does between files
    with open(out / "objects.csv", newline="") as fh:
        assert {r["file"].rsplit("/", 1)[-1] for r in csv.DictReader(fh)} == {"img0.tif"}
    ups = list(segment_folder(folder, out, resume=True))
    assert [u.status for u in ups][1:] == ["skipped", "done", "done"]


def test_method_and_model_are_passed_through(folder, tmp_path, monkeypatch):
    import napari_mae.segmentation as seg

    seen = []

    def fake(image, **kw):
        seen.append((kw.get("method"), kw.get("model", "not given")))
        return np.zeros(image.shape[:2], np.uint32), {}

    monkeypatch.setattr(seg, "segment_instances", fake)
    ckpt = tmp_path / "best.pt"
    ckpt.touch()  # segment_folder checks that a model path exists before any output
    list(segment_folder(str(folder / "img*.tif"), tmp_path / "o", method="learned", model=str(ckpt)))
    assert seen == [("learned", str(ckpt))] * 3
    seen.clear()
    list(segment_folder(str(folder / "img*.tif"), tmp_path / "p"))
    assert seen == [(None, "not given")] * 3  # segment_instances' own defaults


def _bundled_segmenter():
    from napari_mae._names import bundled_segmenter_path

    path = bundled_segmenter_path("default-2d")
    if path is None or not path.is_file():
        pytest.skip("no bundled segmentation model")


def test_cli_folder_and_ome_zarr_learned(folder, tmp_path, capsys):
    from ome_zarr.writer import write_image

    _bundled_segmenter()
    out = tmp_path / "learned"
    args = ["segment", str(folder / "img*.tif"), "--out", str(out), "--method", "learned", "--quiet"]
    assert main([*args, "--model", "default-2d"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_objects"] == 14
    rec = json.loads((out / ".napari-mae-batch" / "img2_labels.json").read_text())
    assert rec["method"] == "learned" and rec["model"] == "default-2d"
    assert main([*args, "--model", "none", "--overwrite"]) == 2
    assert "needs a segmentation model" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path / "missing.pt"), "--overwrite"]) == 2
    assert "no such file" in capsys.readouterr().err

    img = np.concatenate([_nuclei(6, 0), _nuclei(6, 1)], axis=1).astype(np.float32)  # (80, 160)
    path = tmp_path / "plane.zarr"
    write_image(img, str(path), axes="yx", scale={"y": 1.0, "x": 1.0}, scale_factors=())
    zargs = [
        "segment",
        str(path),
        "--workers",
        "0",
        "--block-size",
        "40",
        "80",
        "--method",
        "learned",
        "--quiet",
    ]
    assert main(zargs) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=pytest.fail)  # strict
    assert res["method"] == "learned" and res["model"] == "default-2d"
    assert res["parameters"]["threshold"] is None  # the decoder's own thresholds
    assert res["n_objects"] == 12 and res["blocks"] == 4


def test_folder_on_dask_workers_equals_one_by_one(folder, tmp_path):
    from napari_mae.distributed import dask_client

    ref = {u.path.name: u for u in segment_folder(folder, tmp_path / "a")}
    with dask_client(2, processes=False) as client:
        ups = list(segment_folder(folder, tmp_path / "b", client=client))
    assert sorted(u.index for u in ups) == [0, 1, 2, 3]
    got = {u.path.name: u for u in ups}
    assert {k: u.status for k, u in got.items()} == {k: u.status for k, u in ref.items()}
    assert got["broken.tif"].error  # reported by the worker, the others went on
    for name in ("img0", "img1", "img2"):
        a = tifffile.imread(tmp_path / "a" / f"{name}_labels.tif")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "b" / f"{name}_labels.tif"), a)
    assert (tmp_path / "b" / "objects.csv").read_text() == (
        tmp_path / "a" / "objects.csv"
    ).read_text().replace(str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.parametrize("mode", ["folder", "ome-zarr"])
def test_cli_scheduler_that_does_not_answer(mode, folder, tmp_path, capsys):
    import time

    from ome_zarr.writer import write_image

    if mode == "folder":
        args = ["segment", str(folder), "--out", str(tmp_path / "o")]
    else:
        path = tmp_path / "vol.zarr"
        write_image(np.stack([_nuclei(3, 0)] * 4).astype(np.float32), str(path), axes="zyx", scale_factors=())
        args = ["segment", str(path)]
    t0 = time.perf_counter()
    assert main([*args, "--scheduler", "tcp://127.0.0.1:9", "--quiet"]) == 2
    assert time.perf_counter() - t0 < 15  # dask_client's 5 s, not a hang
    assert "no dask scheduler answered" in capsys.readouterr().err
    if mode == "ome-zarr":
        assert not (tmp_path / "vol.zarr" / "labels").exists()  # nothing written


def test_cli_folder_mode(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["segment", str(folder), "--out", str(out), "--quiet"]) == 1  # one file failed
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["segmented"] == 3 and len(summary["failed"]) == 1 and summary["n_objects"] == 14
    # auto decides per file: the summary says which method each got, and where the decoder was unsure
    assert sum(summary["methods"].values()) == 3 and isinstance(summary["fallbacks"], list)
    assert main(["segment", str(folder / "img*.tif"), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["segment", str(folder / "img*.tif"), "--out", str(out), "--resume", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 3


def test_cli_ome_zarr_mode(tmp_path, capsys):
    from ome_zarr.writer import write_image

    img = np.stack([_nuclei(6, 0)] * 12).astype(np.float32)  # (12, 80, 80): tubes through z
    path = tmp_path / "vol.zarr"
    write_image(img, str(path), axes="zyx", scale={"z": 1.0, "y": 1.0, "x": 1.0}, scale_factors=())
    args = ["segment", str(path), "--workers", "0", "--block-size", "12", "40", "40", "--quiet"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_objects"] == 6 and res["blocks"] == 4 and res["out"].endswith("labels/napari-mae")
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    zarr_plain = tmp_path / "plain.zarr"
    import zarr

    zarr.create_array(str(zarr_plain), shape=(8, 8), dtype="f4")
    assert main(["segment", str(zarr_plain), "--workers", "0"]) == 2
    assert "without OME metadata" in capsys.readouterr().err


def test_equal_stems_of_two_formats_get_two_labels_files(tmp_path):
    from skimage.io import imsave

    src = tmp_path / "images"
    src.mkdir()
    tifffile.imwrite(src / "x.tif", _nuclei(3, 0))
    imsave(src / "x.png", _nuclei(5, 1), check_contrast=False)
    out = tmp_path / "out"
    ups = list(segment_folder(src, out, method="classical"))
    assert [u.status for u in ups] == ["done", "done"]
    # the second overwrote the first's labels under one name
    assert tifffile.imread(out / "x_png_labels.tif").max() == 5
    assert tifffile.imread(out / "x_tif_labels.tif").max() == 3


def test_ctrl_c_in_a_folder_run_says_how_to_go_on(folder, tmp_path, monkeypatch, capsys):
    import napari_mae.batch as batch

    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "segment_folder", interrupted)
    assert main(["segment", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "interrupted" in err
