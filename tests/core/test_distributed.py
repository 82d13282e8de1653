"""OME-Zarr I/O and block-wise segmentation (napari_mae.io.omezarr, napari_mae.distributed).

Tiny volumes; one LocalCluster test with 2 worker threads (processes=False), seconds.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from napari_mae.distributed import (
    BlockwiseError,
    GlobalParameters,
    SchedulerError,
    block_grid,
    dask_client,
    estimate_global_parameters,
    segment_blockwise,
    work_dir_for,
)
from napari_mae.io.omezarr import (
    OMEZarrError,
    read_layers,
    read_ome_zarr,
    read_ome_zarr_image,
    write_ome_labels,
)
from napari_mae.segmentation import segment_instances


def _spheres(shape=(32, 96, 96), step=14, r=5, seed=0):
    """Bright spheres on a grid, ground truth; blocks of (16, 48, 48) cut some on every face."""
    gt = np.zeros(shape, np.uint32)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    k = 0
    for c in np.ndindex(*[max(1, n // step) for n in shape]):
        centre = [6 + i * step for i in c]
        if any(ci + r >= n for ci, n in zip(centre, shape)):
            continue
        k += 1
        gt[sum((g - ci) ** 2 for g, ci in zip(grids, centre)) < r * r] = k
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter((gt > 0).astype(np.float32), 1) + 0.05 * rng.standard_normal(shape)
    return img.astype(np.float32), gt


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a renumbering of the labels."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.fixture
def ome_image(tmp_path):
    from ome_zarr.writer import write_image

    img, gt = _spheres()
    path = tmp_path / "img.zarr"
    write_image(
        img,
        str(path),
        axes="zyx",
        scale={"z": 2.0, "y": 0.5, "x": 0.5},
        axes_units={a: "micrometer" for a in "zyx"},
        scale_factors=(2,),
        storage_options={"chunks": (16, 48, 48)},
    )
    return path, img, gt


# --------------------------------------------------------------------------- OME-Zarr


def test_read_ome_zarr_levels_axes_scale_units(ome_image):
    path, img, _ = ome_image
    im = read_ome_zarr(path)
    assert im.axes == "ZYX" and len(im.levels) == 2
    assert im.spacing(0) == (2.0, 0.5, 0.5) and im.spacing(1) == (2.0, 1.0, 1.0)
    assert im.unit == "micrometer"
    assert hasattr(im.levels[0], "dask")  # lazy
    np.testing.assert_array_equal(np.asarray(im.levels[0]), img)
    data, spacing, meta = read_ome_zarr_image(path, level=1)
    assert data.shape == (32, 48, 48) and spacing == (2.0, 1.0, 1.0) and meta["axes"] == "ZYX"
    with pytest.raises(OMEZarrError, match="level 2"):
        read_ome_zarr_image(path, level=2)


def test_labels_beside_the_image_and_reader_layers(ome_image):
    path, img, gt = ome_image
    write_ome_labels(
        path, gt, name="truth", axes="ZYX", spacing=(2.0, 0.5, 0.5), unit="micrometer", chunks=(16, 48, 48)
    )
    assert json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["truth"]
    im = read_ome_zarr(path)
    np.testing.assert_array_equal(np.asarray(im.labels["truth"][0]), gt)
    layers = read_layers(str(path))
    (data, kw, kind), (ldata, lkw, lkind) = layers
    assert kind == "image" and kw["multiscale"] and len(data) == 2
    assert kw["scale"] == [2.0, 0.5, 0.5] and kw["units"] == ["micrometer"] * 3
    assert kw["axis_labels"] == ["z", "y", "x"]
    assert lkind == "labels" and lkw["scale"] == [2.0, 0.5, 0.5]


@pytest.mark.parametrize("kind", ["no-metadata-group", "plain-array", "not-zarr"])
def test_zarr_without_ome_metadata_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "x.zarr"
    if kind == "no-metadata-group":
        zarr.open_group(str(path), mode="w")
    elif kind == "plain-array":
        zarr.create_array(str(path), shape=(8, 8), dtype="f4")
    else:
        path.mkdir()
    with pytest.raises(OMEZarrError, match="no OME-Zarr image|without OME metadata|not a Zarr"):
        read_ome_zarr(path)
    if kind == "plain-array":  # accepted with plain=True, spacing 1
        im = read_ome_zarr(path, plain=True)
        assert im.axes == "YX" and im.spacing() == (1.0, 1.0) and im.unit == "pixel"


def test_npe2_reader_through_the_manifest(ome_image):
    import npe2

    path, _, _ = ome_image
    npe2.PluginManager.instance().discover()
    layers = npe2.read([str(path)], stack=False, plugin_name="napari-mae")
    assert [kind for *_, kind in layers] == ["image"]
    assert layers[0][1]["scale"] == [2.0, 0.5, 0.5]


# --------------------------------------------------------------------------- blocks


def test_block_grid_covers_the_volume_once():
    shape, bs, ov = (10, 23), (4, 10), (2, 3)
    cover = np.zeros(shape, int)
    for _, core, outer, inner in block_grid(shape, bs, ov):
        cover[core] += 1
        assert all(o.start <= c.start and c.stop <= o.stop for c, o in zip(core, outer))
        assert all(i.stop - i.start == c.stop - c.start for i, c in zip(inner, core))
    assert (cover == 1).all()


def test_global_parameters_from_the_whole_volume_match_segment_instances():
    img, _ = _spheres()
    params, _ = estimate_global_parameters(img, sample_voxels=img.size)
    _, info = segment_instances(img)
    assert params.object_radius == pytest.approx(info["radius"])
    assert params.threshold == pytest.approx(info["threshold"], rel=1e-5)
    assert params.bright_objects is True


def test_sample_without_objects_is_a_clear_error():
    with pytest.raises(ValueError, match="no object"):
        estimate_global_parameters(
            np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32) * 0 + 1
        )


def test_blockwise_equals_in_memory_and_stitches_faces(tmp_path):
    img, gt = _spheres()
    ref, info = segment_instances(img)
    res = segment_blockwise(
        img, tmp_path / "o.zarr" / "labels" / "seg", block_shape=(16, 48, 48), sample_voxels=img.size
    )
    assert res["blocks"] == 2 * 2 * 2 and res["links"] > 0
    lab = np.asarray(zarr.open_array(str(tmp_path / "o.zarr" / "labels" / "seg" / "s0")))
    assert lab.dtype == np.uint32 and lab.max() == res["n_objects"] == gt.max()
    assert np.array_equal(np.unique(lab), np.arange(lab.max() + 1))  # consecutive
    # Objects cut by block faces got one label each, and the labels are the in-memory ones.
    assert _same_partition(lab, ref)
    assert not work_dir_for(tmp_path / "o.zarr" / "labels" / "seg").exists()


def test_existing_output_refused_then_resume_reuses_finished_blocks(tmp_path):
    img, _ = _spheres()
    out = tmp_path / "o.zarr" / "labels" / "seg"
    kw = dict(block_shape=(16, 48, 48), object_radius=5.0)
    segment_blockwise(img, out, **kw)
    first = np.asarray(zarr.open_array(str(out / "s0")))
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        segment_blockwise(img, out, **kw)
    assert segment_blockwise(img, out, resume=True, **kw)["blocks_computed"] == 0  # already complete

    # A run that stopped after 3 blocks: the rerun computes only the other 5.
    from napari_mae._progress import Cancelled

    def stop_after_3(done, total, message):
        if message == "segmenting blocks" and done >= 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        segment_blockwise(img, out, overwrite=True, progress=stop_after_3, **kw)
    with pytest.raises(FileExistsError, match="unfinished run"):
        segment_blockwise(img, out, **kw)
    res = segment_blockwise(img, out, resume=True, **kw)
    assert (res["blocks_reused"], res["blocks_computed"]) == (3, 5)
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "s0"))), first)


def test_overwrite_and_resume_together_refused(tmp_path):
    from napari_mae.distributed import check_output

    assert check_output(tmp_path / "o.zarr" / "labels" / "seg") == "new"
    with pytest.raises(ValueError, match="not both"):
        check_output(tmp_path / "o.zarr" / "labels" / "seg", overwrite=True, resume=True)


def test_local_cluster_two_workers_same_labels(tmp_path, ome_image):
    path, img, _ = ome_image
    data, spacing, _ = read_ome_zarr_image(path)
    kw = dict(
        spacing=spacing, axes="ZYX", unit="micrometer", block_shape=(16, 48, 48), sample_voxels=img.size
    )
    ref = segment_blockwise(data, tmp_path / "a.zarr" / "labels" / "seg", **kw)
    with dask_client(2, processes=False) as client:
        res = segment_blockwise(data, path / "labels" / "napari-mae", client=client, **kw)
    assert res["n_objects"] == ref["n_objects"] > 0
    a = np.asarray(zarr.open_array(str(tmp_path / "a.zarr" / "labels" / "seg" / "s0")))
    b = np.asarray(read_ome_zarr(path).labels["napari-mae"][0])
    np.testing.assert_array_equal(a, b)
    labels_meta = read_layers(str(path))[1][1]
    assert labels_meta["scale"] == [2.0, 0.5, 0.5] and labels_meta["units"] == ["micrometer"] * 3


def test_scheduler_that_does_not_answer_fails_within_seconds():
    t0 = time.perf_counter()
    with (
        pytest.raises(SchedulerError, match="no dask scheduler answered"),
        dask_client(scheduler="tcp://127.0.0.1:9", timeout=1),
    ):
        pass
    assert time.perf_counter() - t0 < 10


def test_block_gets_the_method_model_and_parameters(monkeypatch):
    import napari_mae.segmentation as seg
    from napari_mae.distributed import segment_block

    seen = {}

    def fake(image, **kw):
        seen.clear()
        seen.update(kw)
        return np.zeros(np.shape(image), np.uint32), {}

    monkeypatch.setattr(seg, "segment_instances", fake)
    block = np.random.default_rng(0).random((16, 16))
    learned = GlobalParameters((0.0, 1.0), 2.0, True, float("nan"), (1.0, 1.0), method="learned")
    segment_block(block, learned, model="run/best.pt")
    assert seen["method"] == "learned" and seen["model"] == "run/best.pt" and seen["object_radius"] == 2.0
    assert "threshold" not in seen  # the decoder's own thresholds
    # The volume's scale: no re-measured radius per block; the volume's normalisation.
    assert seen["radius_from_planes"] is False and seen["intensity_range"] == (0.0, 1.0)
    classical = GlobalParameters((0.0, 2.0), 2.0, True, 0.3, (1.0, 1.0))
    segment_block(block, classical, model="ignored")
    assert seen["method"] == "classical" and "model" not in seen
    assert seen["threshold"] == 0.3 and seen["intensity_range"] == (0.0, 2.0)  # the volume's cut and range


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="auto"), "method"),
        (dict(object_radius=0.0), "object_radius"),
        (dict(intensity_range=(1.0, 1.0)), "intensity_range"),
        (dict(threshold=float("nan")), "finite threshold"),
    ],
)
def test_global_parameters_bad(kwargs, match):
    good = dict(
        intensity_range=(0.0, 1.0), object_radius=2.0, bright_objects=True, threshold=0.3, spacing=(1.0,)
    )
    with pytest.raises(ValueError, match=match):
        GlobalParameters(**{**good, **kwargs})


def test_sample_crops_spread_and_sized():
    from napari_mae.distributed import sample_crops

    assert sample_crops((8, 8), 1000) == [(slice(0, 8), slice(0, 8))]  # small: the whole image
    crops = sample_crops((40, 200, 60), 40 * 60 * 60, n_samples=4)
    assert len(crops) == 4
    starts = [c[1].start for c in crops]
    assert starts == sorted(starts) and len(set(starts)) == 4  # spread along Y, the longest axis
    for c in crops:
        assert all(0 <= s.start < s.stop <= n for s, n in zip(c, (40, 200, 60)))
        assert np.prod([s.stop - s.start for s in c]) <= 1.2 * 40 * 60 * 60 / 4


def test_parameters_on_the_workers_equal_those_here():
    img, _ = _spheres()
    kw = dict(sample_voxels=img.size // 2, n_samples=4)
    here, info = estimate_global_parameters(img, **kw)
    assert len(info["samples"]) == 4
    with dask_client(2, processes=False) as client:
        there, _ = estimate_global_parameters(img, client=client, **kw)
    assert there == here


def _disks_2d(shape=(128, 128), step=22, r=6, seed=0):
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.int32)
    k = 0
    for cy in range(12, shape[0] - 8, step):
        for cx in range(12, shape[1] - 8, step):
            k += 1
            gt[disk((cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)), r, shape=shape)] = k
    img = ndi.gaussian_filter((gt > 0).astype(np.float32), 1) + 0.05 * rng.standard_normal(shape)
    return img.astype(np.float32), gt


@pytest.fixture
def segmenter_copy(tmp_path):
    """The bundled nuclei model under a new path (a fresh cache key)."""
    import shutil

    from napari_mae._names import bundled_segmenter_path

    src = bundled_segmenter_path("default-2d")
    if src is None or not src.is_file():
        pytest.skip("no bundled segmentation model")
    dst = tmp_path / "seg.pt"
    shutil.copy(src, dst)
    return dst


def test_learned_blockwise_loads_the_model_once_and_matches_in_memory(tmp_path, monkeypatch, segmenter_copy):
    import napari_mae.models.decoder as decoder
    from napari_mae.segmentation.metrics import match_instances

    loads = []
    real = decoder.load_segmenter
    monkeypatch.setattr(
        decoder, "load_segmenter", lambda spec, *a, **k: (loads.append(spec), real(spec, *a, **k))[1]
    )
    img, gt = _disks_2d()
    out = tmp_path / "o.zarr" / "labels" / "seg"
    res = segment_blockwise(img, out, method="learned", model=segmenter_copy, block_shape=(64, 64))
    assert res["blocks"] == 4 and res["method"] == "learned" and res["parameters"]["method"] == "learned"
    assert res["model"] == str(segmenter_copy.resolve())
    assert len(loads) == 1  # a path: loaded once for the sample and every block
    lab = np.asarray(zarr.open_array(str(out / "s0")))
    ref, info = segment_instances(img, method="learned", model=segmenter_copy)
    assert info["method"] == "learned"
    assert match_instances(ref, lab)["f1"] >= 0.95 and match_instances(gt, lab)["f1"] >= 0.9
    # An MAE (not a segmentation model) with method="learned" is an error, not a silent classical run.
    with pytest.raises(Exception, match="segmentation"):
        from napari_mae._names import bundled_weights_path

        segment_blockwise(
            img,
            tmp_path / "p.zarr" / "labels" / "seg",
            method="learned",
            model=bundled_weights_path("default-2d"),
        )


def test_learned_on_thread_workers_same_labels(tmp_path, segmenter_copy):
    img, _ = _disks_2d()
    kw = dict(method="learned", model=str(segmenter_copy), block_shape=(64, 64))
    ref = segment_blockwise(img, tmp_path / "a.zarr" / "labels" / "seg", **kw)
    with dask_client(2, processes=False) as client:
        res = segment_blockwise(img, tmp_path / "b.zarr" / "labels" / "seg", client=client, **kw)
    assert res["method"] == "learned" and res["n_objects"] == ref["n_objects"] > 0
    a = np.asarray(zarr.open_array(str(tmp_path / "a.zarr" / "labels" / "seg" / "s0")))
    b = np.asarray(zarr.open_array(str(tmp_path / "b.zarr" / "labels" / "seg" / "s0")))
    np.testing.assert_array_equal(a, b)


def test_learned_blocks_use_one_torch_thread_per_worker_thread(tmp_path, monkeypatch):
    import torch

    import napari_mae.segmentation as seg

    seen = []

    def fake(image, **kw):  # records the torch threads of the thread that segments
        seen.append(torch.get_num_threads())
        info = {"method": "learned", "n_objects": 1, "radius": 5.0, "bright_objects": True}
        return np.zeros(np.shape(image), np.uint32), dict(info, threshold=float("nan"))

    monkeypatch.setattr(seg, "segment_instances", fake)
    img, _ = _disks_2d()
    with dask_client(1, processes=False) as client:
        client.submit(torch.set_num_threads, 2, pure=False).result()  # the worker's one thread
        assert client.submit(torch.get_num_threads, pure=False).result() == 2
        segment_blockwise(
            img, tmp_path / "o.zarr" / "labels" / "s", method="learned", block_shape=(64, 64), client=client
        )
    assert len(seen) == 1 + 4 and set(seen) == {1}  # the sample, then 4 blocks


def test_blockwise_error_is_a_runtime_error():
    assert issubclass(SchedulerError, BlockwiseError) and issubclass(BlockwiseError, RuntimeError)


class _KillsItsWorker:
    """An array whose block at ``kill_at`` (outer start) ends the worker process reading it."""

    def __init__(self, array, kill_at):
        self.array, self.kill_at = array, tuple(kill_at)
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, slices):
        if tuple(s.start for s in slices) == self.kill_at:
            import os

            os._exit(1)  # what the kernel's OOM killer does to a worker
        return self.array[slices]


@pytest.mark.slow  # ~20 s: worker processes start and restart
def test_worker_killed_is_reported_and_rerun_resumes(tmp_path):
    import cloudpickle
    import dask
    import distributed  # noqa: F401  (its config defaults, before dask.config.set)

    img, _ = _spheres()
    out = tmp_path / "o.zarr" / "labels" / "seg"
    kw = dict(block_shape=(16, 48, 48), object_radius=5.0, threshold=0.3)
    grid = list(block_grid(img.shape, (16, 48, 48), (22, 22, 22)))
    last_outer = tuple(s.start for s in grid[-1][2])
    cloudpickle.register_pickle_by_value(__import__(__name__))
    try:
        with (
            dask.config.set({"distributed.scheduler.allowed-failures": 0}),
            dask_client(1) as client,
            pytest.raises(BlockwiseError, match="worker died.*rerun with --resume"),
        ):
            segment_blockwise(_KillsItsWorker(img, last_outer), out, client=client, **kw)
    finally:
        cloudpickle.unregister_pickle_by_value(__import__(__name__))
    res = segment_blockwise(img, out, resume=True, **kw)
    assert res["blocks_reused"] >= 1 and res["blocks_computed"] >= 1
    assert res["blocks_reused"] + res["blocks_computed"] == 8
    ref = segment_blockwise(img, tmp_path / "r.zarr" / "labels" / "seg", **kw)
    assert res["n_objects"] == ref["n_objects"]


@pytest.fixture
def local_decoder(monkeypatch):
    """A tiny decoder whose plane-stack maps see only each voxel (no context), and the
    (volume, radius) pairs it was given: what the decoder's input was, block by block."""
    import torch

    import napari_mae.segmentation.learned as learned
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder
    from napari_mae.models.mae import build_model

    seen = []

    def local_maps(net, volume, spacing, radius, r_ref, **kw):
        seen.append((volume.copy(), radius))
        v = np.clip(volume, 0.0, 1.0)
        return np.stack([v, 1.0 - v, 1.0 - v]).astype(np.float32), (1.0, 1.0, 1.0)

    monkeypatch.setattr(learned, "predict_volume_maps", local_maps)
    torch.manual_seed(0)
    return InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4)).eval(), seen


def test_learned_blocks_see_the_volumes_values_and_scale(tmp_path, monkeypatch, local_decoder):
    """Each learned block is normalised and resampled as the whole volume is (the volume's
    range; its radius, not one re-measured on the block's planes); with a decoder that
    sees only each voxel's neighbourhood, the block-wise labels are then the in-memory
    ones: what is left between the two is the real decoder's context (its windows)."""
    import napari_mae.segmentation.learned as learned

    net, seen = local_decoder

    def planes_radius(net, volume, *args, **kwargs):  # the decoder's size estimate: depends on the volume
        return 4.0 + float(volume.mean())

    monkeypatch.setattr(learned, "_radius_from_planes", planes_radius)
    img, gt = _spheres()
    img += np.linspace(0.0, 0.2, img.shape[0], dtype=np.float32)[:, None, None]  # blocks differ in range
    ref, info = segment_instances(img, method="learned", model=net)
    whole, r_whole = seen.pop()
    assert info["method"] == "learned" and r_whole == info["radius_planes"]
    out = tmp_path / "o.zarr" / "labels" / "seg"
    res = segment_blockwise(
        img, out, method="learned", model=net, block_shape=(16, 48, 48), sample_voxels=img.size
    )
    assert res["parameters"]["object_radius"] == r_whole
    blocks = seen[1:]  # after the sample (the whole volume)
    grid = list(block_grid(img.shape, res["block_shape"], res["overlap"]))
    assert len(blocks) == len(grid) == 8
    for (volume, radius), (_, _, outer, _) in zip(blocks, grid):
        assert radius == r_whole  # the volume's scale in every block
        # the volume's values: the block is scaled by the smoothed volume's range in the file's
        # units, the whole by decoder_input after its own range, the same map up to rounding
        np.testing.assert_allclose(volume, whole[outer], rtol=0, atol=1e-5)
    lab = np.asarray(zarr.open_array(str(out / "s0")))
    assert lab.max() == ref.max() == gt.max() and _same_partition(lab, ref)


def test_client_gathers_no_volume_sized_array_and_reads_the_labels_once(tmp_path, monkeypatch):
    """The client keeps the blocks' small metadata: what reaches it from the workers
    (block counts, sample infos, the intensity range's strided subsample) is much smaller
    than the volume, and the labels are read once, by the write (no other pass over the
    whole label image, e.g. a label-value scan)."""
    import dask.sizeof
    import distributed

    import napari_mae.distributed as dist
    import napari_mae.segmentation as seg

    def threshold_labels(image, **kw):  # fast: the client's side is what is measured
        lab, n = ndi.label(np.asarray(image) > 0.5)
        info = {
            "n_objects": n,
            "radius": 5.0,
            "threshold": 0.5,
            "bright_objects": True,
            "method": "classical",
        }
        return lab.astype(np.uint32), info

    gathered, log = [], tmp_path / "relabelled.txt"
    real_gather, real_relabel = distributed.Client._gather, dist._relabel_chunk

    async def recording_gather(self, futures, *args, **kwargs):
        result = await real_gather(self, futures, *args, **kwargs)
        gathered.append(dask.sizeof.sizeof(result))
        return result

    def counting_relabel(raw_path, core, lut_slice):  # runs on the workers (a copy): counts in a file
        with open(log, "a") as fh:
            fh.write(json.dumps([[s.start, s.stop] for s in core]) + "\n")
        return real_relabel(raw_path, core, lut_slice)

    monkeypatch.setattr(seg, "segment_instances", threshold_labels)
    monkeypatch.setattr(distributed.Client, "_gather", recording_gather)
    monkeypatch.setattr(dist, "_relabel_chunk", counting_relabel)
    img = _disks_2d((1280, 1280), step=20, r=5)[0]  # 1.6 M pixels: the range reads every 2nd row/column
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=img.shape, chunks=(256, 256), dtype="float32")
    src[:] = img
    with dask_client(2, processes=False) as client:
        res = segment_blockwise(
            src, tmp_path / "o.zarr" / "labels" / "seg", block_shape=(256, 256), client=client
        )
    assert res["blocks"] == 25 and res["n_objects"] > 3000
    assert gathered and sum(gathered) < img.nbytes / 3  # the subsample (a quarter) and a few bytes per block
    relabelled = sorted(json.loads(line) for line in log.read_text().splitlines())
    cores = sorted(
        [[s.start, s.stop] for s in core] for _, core, _, _ in block_grid(img.shape, (256, 256), (0, 0))
    )
    assert relabelled == cores  # every block's labels once: no second pass over the label image


@pytest.mark.parametrize("variant", ["dark", "nan"])
def test_learned_blocks_scaled_as_in_memory_for_dark_objects_and_nan(
    tmp_path, monkeypatch, local_decoder, variant
):
    """The decoder's input of a block is the in-memory one for dark objects (the range of the
    image before its inversion) and with non-finite voxels (left out of the smoothed range,
    not spread over it); the filled-in invalid voxels themselves are not compared."""
    import napari_mae.segmentation.learned as learned

    net, seen = local_decoder
    monkeypatch.setattr(learned, "_radius_from_planes", lambda *a, **k: 4.0)
    img, _ = _spheres()
    invalid = np.zeros(img.shape, bool)
    if variant == "dark":
        img = 1.0 - img
    else:
        invalid[np.random.default_rng(1).random(img.shape) < 0.03] = True
        img[invalid] = np.nan
    segment_instances(img, method="learned", model=net, bright_objects=variant != "dark")
    whole, _ = seen.pop()
    res = segment_blockwise(
        img, tmp_path / "o.zarr" / "labels" / "seg", method="learned", model=net,
        block_shape=(16, 48, 48), sample_voxels=img.size, bright_objects=variant != "dark",
    )  # fmt: skip
    grid = list(block_grid(img.shape, res["block_shape"], res["overlap"]))
    blocks = seen[1:]
    assert len(blocks) == len(grid) == 8
    for (volume, _), (_, _, outer, _) in zip(blocks, grid):
        ok = ~invalid[outer]
        np.testing.assert_allclose(volume[ok], whole[outer][ok], rtol=0, atol=1e-4)
