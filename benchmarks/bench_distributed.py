"""Out-of-core block-wise segmentation on dask.distributed: memory, speed-up, stitching.

Checks :func:`napari_mae.distributed.segment_blockwise` on a synthetic OME-Zarr volume with
instance ground truth, objects placed on the block faces on purpose:

* peak memory (VmHWM) of every worker and of the client during the run (its peak is reset
  when the run starts: data generation and scoring are not the run's), against the memory
  cap the run sets on itself: dask's ``memory_limit`` per worker (``--worker-gb``, default
  cap / workers), which the nanny enforces (it restarts a worker above 95 % of it, and the
  run then fails), and the total cap (``--cap-gb``) compared with the sum of all peaks
  (the client's is measured, not enforced);
* wall time with 1 and 2 workers (each a fresh LocalCluster of single-threaded worker
  processes, start-up excluded, parameter estimation included), per stage, with the CPU
  seconds of every worker and the load average before and after (other processes on the
  machine take their share of the cores: wall speed-up = CPU share x parallel work);
* F1@0.5 against the ground truth (one-to-one matching at IoU >= 0.5 from a sparse
  overlap table accumulated slab by slab, :func:`bench_large.sparse_match`);
* for ground-truth objects crossing a block face vs interior ones: one label / split /
  merged / missed rates (the definitions of ``benchmarks/bench_large.py``: a *piece* of a
  GT object is a predicted label covering >= 10 % of it and lying mostly inside it; split =
  two or more pieces);
* identity on a crop that fits in memory: the 2-worker run vs the same blocks in this
  process (bit for bit), vs ``segment_instances`` on the whole crop (same partition?), and
  vs ``segment_instances``' own tiled path with the same tiles (F1@0.5 between the two).

Usage (from the repository root)::

    python benchmarks/bench_distributed.py --scale 0.004   # 32 MB volume, a few minutes on 2 cores
    python benchmarks/bench_distributed.py --shape 256 256 256 --block 128 --worker-gb 1 --cap-gb 2.5
    python benchmarks/bench_distributed.py --scale 1 --block 256   # 1280^3 float32 = 8.4 GB, cap 4 GB

``--scale`` is the volume's size as a fraction of 8.4 GB (1280^3 float32; the sides shrink
by its cube root, Z first); the cap is 4 GB x scale, but never below ``--min-worker-gb``
per worker (a worker process with numpy/scipy/scikit-image and one block needs ~0.5 GB
whatever the volume: below that, the cap would measure the interpreter, not the method).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large import sparse_match  # noqa: E402

FULL_SHAPE = (1280, 1280, 1280)  # float32: 8.39 GB
FULL_CAP_GB = 4.0
PITCH = 14  # lattice pitch of the objects, voxels
RADIUS = (3.5, 4.5)  # object radii, voxels


# --------------------------------------------------------------------------- data


def volume_shape(scale: float, block: int) -> tuple[int, int, int]:
    """Y and X = 1280 x scale^(1/3) (multiples of 16, at least two blocks); Z so that the
    volume holds about ``scale`` x 1280^3 voxels (at least one block + 16 planes)."""
    f = scale ** (1.0 / 3.0)
    y = x = max(2 * block, int(round(FULL_SHAPE[1] * f / 16)) * 16)
    z = max(block + 16, int(round(scale * float(np.prod(FULL_SHAPE)) / (y * x) / 16)) * 16)
    return (z, y, x)


def make_objects(shape, block: int, seed: int) -> dict:
    """A jittered lattice of balls whose lattice includes every block face coordinate."""
    rng = np.random.default_rng(seed)
    axes = []
    for n in shape:
        start = block % PITCH  # so that block, 2*block, ... are lattice coordinates
        axes.append(np.arange(start, n, PITCH))
    c = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(float)
    faces = [np.arange(block, n, block) for n in shape]
    on_face = np.zeros(c.shape, bool)
    for d in range(3):
        on_face[:, d] = np.isin(c[:, d], faces[d])
    jitter = rng.integers(-2, 3, c.shape).astype(float)
    c = np.where(on_face, c, c + jitter)  # centres on a face stay exactly on it
    r = rng.uniform(*RADIUS, len(c))
    keep = np.all((c - r[:, None] > 0) & (c + r[:, None] < np.asarray(shape) - 1), axis=1)
    c, r = c[keep], r[keep]
    lo = np.floor(c - r[:, None]).astype(int) + 1
    hi = np.ceil(c + r[:, None]).astype(int) - 1
    crossing = np.zeros(len(c), bool)
    for d in range(3):
        for f in faces[d]:
            crossing |= (lo[:, d] <= f - 1) & (hi[:, d] >= f)
    return {
        "centre": c,
        "radius": r,
        "brightness": rng.uniform(0.6, 1.0, len(c)),
        "lo": lo,
        "hi": hi,
        "crossing": crossing,
    }


def render_slab(objects, shape, z0: int, z1: int, seed: int):
    """Image (float32, blurred, noisy) and labels of planes z0..z1 (drawn with a margin)."""
    m = 6
    a, b = max(0, z0 - m), min(shape[0], z1 + m)
    img = np.full((b - a, *shape[1:]), 0.1, np.float32)
    lab = np.zeros((b - a, *shape[1:]), np.uint32)
    sel = np.flatnonzero((objects["hi"][:, 0] >= a) & (objects["lo"][:, 0] < b))
    for i in sel:
        lo, hi, c, r = objects["lo"][i], objects["hi"][i], objects["centre"][i], objects["radius"][i]
        z_lo, z_hi = max(lo[0], a), min(hi[0] + 1, b)
        box = (slice(z_lo - a, z_hi - a), slice(lo[1], hi[1] + 1), slice(lo[2], hi[2] + 1))
        g = np.ogrid[z_lo:z_hi, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        inside = sum((g[d] - c[d]) ** 2 for d in range(3)) < r * r
        img[box][inside] = 0.1 + objects["brightness"][i]
        lab[box][inside] = i + 1
    img = ndi.gaussian_filter(img, 1.0)
    rng = np.random.default_rng([seed, z0])
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return img[z0 - a : z1 - a], lab[z0 - a : z1 - a]


def write_volume(path: Path, gt_path: Path, shape, block: int, seed: int) -> dict:
    """The OME-Zarr image (chunks of ``block``) and a plain Zarr ground truth, slab by slab."""
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    objects = make_objects(shape, block, seed)
    group = zarr.open_group(str(path), mode="w")
    # Input chunks no larger than a block: a worker reading its block decompresses only
    # the chunks it needs (chunks of whole planes would tie its memory to the volume's Y x X).
    chunks = (min(block, 64),) + tuple(min(block, n) for n in shape[1:])
    image = group.create_array("s0", shape=shape, chunks=chunks, dtype="float32")
    gt = zarr.create_array(str(gt_path), shape=shape, chunks=chunks, dtype="uint32", overwrite=True)
    for z0 in range(0, shape[0], chunks[0]):
        z1 = min(z0 + chunks[0], shape[0])
        im, lab = render_slab(objects, shape, z0, z1, seed)
        image[z0:z1] = im
        gt[z0:z1] = lab
    write_multiscales_metadata(
        group,
        datasets=[{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
        axes=[{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        name="bench",
    )
    return objects


# --------------------------------------------------------------------------- scoring


def contingency_zarr(gt, pred, rows: int | None = None):
    """Sparse overlap table (gt id, pred id, count) of two Zarr arrays, slab by slab."""
    n_p = 1 << 32
    if rows is None:  # slabs of about 4 M voxels
        rows = max(1, (1 << 22) // int(np.prod(gt.shape[1:])))
    us, cs = [], []
    for z0 in range(0, gt.shape[0], rows):
        g = np.asarray(gt[z0 : z0 + rows]).astype(np.int64)
        p = np.asarray(pred[z0 : z0 + rows]).astype(np.int64)
        u, c = np.unique(g * n_p + p, return_counts=True)
        us.append(u)
        cs.append(c)
    u, inv = np.unique(np.concatenate(us), return_inverse=True)
    cnt = np.bincount(inv, weights=np.concatenate(cs)).astype(np.int64)
    return u // n_p, u % n_p, cnt


def score(gt, pred, objects) -> dict:
    g, p, cnt = contingency_zarr(gt, pred)
    n_gt, n_pred = len(objects["radius"]), int(p.max())
    m = sparse_match(g, p, cnt, n_gt, n_pred)
    present = m["_area_g"][1:] > 0
    n_cover, n_piece, matched = m["_n_cover"][1:], m["_n_piece"][1:], m["_matched"][1:]

    def group(sel):
        sel = sel & present
        n = int(sel.sum())
        return {
            "n": n,
            "matched": int((matched & sel).sum()),
            "one_label": int(((n_piece == 1) & sel).sum()),
            "split": int(((n_piece >= 2) & sel).sum()),
            "merged": int(((n_piece == 0) & (n_cover > 0) & sel).sum()),
            "missed": int(((n_cover == 0) & sel).sum()),
        }

    return {
        **{k: v for k, v in m.items() if not k.startswith("_")},
        "face": group(objects["crossing"]),
        "interior": group(~objects["crossing"]),
    }


def same_partition(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """Whether two label images are equal up to renumbering; share of voxels that differ."""
    fg_diff = float(np.mean((a > 0) != (b > 0)))
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    one_to_one = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    return bool(one_to_one and fg_diff == 0), fg_diff


# --------------------------------------------------------------------------- runs


def _worker_maxrss() -> int:
    """Peak RSS of this process's memory since it started (VmHWM). Not ru_maxrss: Linux
    keeps that across exec, so a worker spawned from a large client reports the client's."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _reset_maxrss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_workers(
    n_workers: int, image_path: Path, out: Path, block: int, worker_cap_bytes: float, extra=None
) -> dict:
    from napari_mae.distributed import dask_client, segment_blockwise
    from napari_mae.io.omezarr import read_ome_zarr_image

    data, spacing, _ = read_ome_zarr_image(image_path)
    limit = int(worker_cap_bytes)
    t_start = time.perf_counter()
    with dask_client(n_workers, memory_limit=limit) as client:
        startup = time.perf_counter() - t_start
        idle = client.run(_worker_rss)
        cpu0 = client.run(_cpu_seconds)
        reset = _reset_maxrss()  # the client's peak from here on: the run's, not the data generation's
        client_start = _worker_rss()  # what the client held before the run (the peak's floor)
        load0, ccpu0 = os.getloadavg(), _cpu_seconds()
        t0 = time.perf_counter()
        res = segment_blockwise(
            data, out, spacing=spacing, axes="ZYX", unit="micrometer", block_shape=(block,) * 3, client=client
        )
        wall = time.perf_counter() - t0
        client_cpu, load1 = _cpu_seconds() - ccpu0, os.getloadavg()
        client_peak = _worker_maxrss() if reset else None
        peaks = client.run(_worker_maxrss)
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in client.run(_cpu_seconds).items()}
        n_alive = len(client.scheduler_info()["workers"])
        extra_res = extra(client) if extra is not None else None
    return {
        "workers": n_workers,
        "wall_s": wall,
        "startup_s": startup,
        "memory_limit_per_worker": limit,
        "idle_rss": sorted(idle.values()),
        "peak_rss": sorted(peaks.values()),
        "client_peak_rss": client_peak,
        "client_start_rss": client_start,
        "worker_cpu_s": sorted(cpu.values()),
        "client_cpu_s": client_cpu,
        "loadavg": [load0, load1],
        "workers_alive_at_end": n_alive,
        "result": res,
        "extra": extra_res,
    }


def identity_check(client, crop: np.ndarray, block: tuple[int, ...], tmp: Path) -> dict:
    """2 workers vs in-process blocks vs segment_instances (untiled and tiled) on ``crop``."""
    import zarr

    from napari_mae.distributed import segment_blockwise

    try:
        from napari_mae.segmentation.metrics import match_instances
    except ImportError:  # before segmentation/ held the metrics
        from napari_mae.metrics import match_instances
    from napari_mae.segmentation import segment_instances

    kw = dict(block_shape=block, sample_voxels=crop.size)
    t0 = time.perf_counter()
    segment_blockwise(crop, tmp / "dist.zarr" / "labels" / "l", client=client, **kw)
    t_dist = time.perf_counter() - t0
    t0 = time.perf_counter()
    segment_blockwise(crop, tmp / "local.zarr" / "labels" / "l", client=None, **kw)
    t_local = time.perf_counter() - t0
    dist = np.asarray(zarr.open_array(str(tmp / "dist.zarr" / "labels" / "l" / "s0")))
    local = np.asarray(zarr.open_array(str(tmp / "local.zarr" / "labels" / "l" / "s0")))
    t0 = time.perf_counter()
    ref, info = segment_instances(crop)
    t_ref = time.perf_counter() - t0
    tiled, _ = segment_instances(crop, tile_shape=block)
    same, diff = same_partition(dist, ref)
    return {
        "crop_shape": list(crop.shape),
        "block": list(block),
        "distributed_equals_in_process_blocks": bool(np.array_equal(dist, local)),
        "equals_segment_instances_untiled": same,
        "foreground_voxels_differing_from_untiled": diff,
        "n_objects": [int(dist.max()), int(ref.max()), int(tiled.max())],
        "f1_vs_segment_instances_tiled": match_instances(tiled, dist)["f1"],
        "f1_untiled_vs_tiled": match_instances(ref, tiled)["f1"],
        "seconds": {"distributed": t_dist, "in_process_blocks": t_local, "segment_instances": t_ref},
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def report(r: dict) -> None:
    shape, vol = r["shape"], r["volume_bytes"]
    print(f"\nvolume {shape[0]} x {shape[1]} x {shape[2]} float32 = {_gb(vol)} ({r['n_objects']} objects), "
          f"blocks {r['block']}^3, cap {_gb(r['cap_bytes'])} (volume / cap = {vol / r['cap_bytes']:.2f})")  # fmt: skip
    print(f"load average at start: {r['loadavg']}")
    print(
        f"{'workers':>7} {'wall s':>8} {'speed-up':>8} {'parameters/blocks/stitch/write s':>34} "
        f"{'worker CPU s':>14} {'peak RSS per worker':>24} {'client peak':>11} {'(start)':>9} {'sum/cap':>8} {'limit':>9} "
        f"{'F1@0.5':>7} {'load 1-min before, after':>25}"
    )
    base = r["runs"][0]["wall_s"]
    for run in r["runs"]:
        peaks = ", ".join(_gb(p) for p in run["peak_rss"])
        st = run["result"].get("stage_seconds", {})
        stages = " / ".join(
            f"{st.get(k, float('nan')):.0f}" for k in ("parameters", "blocks", "stitch", "write")
        )
        cpu = ", ".join(f"{c:.0f}" for c in run["worker_cpu_s"])
        client = run["client_peak_rss"] or 0
        total = sum(run["peak_rss"]) + client
        load = f"{run['loadavg'][0][0]:.1f}, {run['loadavg'][1][0]:.1f}"
        print(f"{run['workers']:>7} {run['wall_s']:>8.1f} {base / run['wall_s']:>8.2f} {stages:>34} {cpu:>14} "
              f"{peaks:>24} {_gb(client):>11} {_gb(run.get('client_start_rss') or 0):>9} {total / r['cap_bytes']:>8.2f} "
              f"{_gb(run['memory_limit_per_worker']):>9} {run['score']['f1']:>7.4f} {load:>25}")  # fmt: skip
    print(f"this process's peak RSS over the whole benchmark (data generation and scoring included) "
          f"{_gb(r['client_maxrss'])}; 'client peak' is its peak during the segmentation run only")  # fmt: skip
    s = r["runs"][-1]["score"]
    print(
        f"\n{'GT objects':<22} {'n':>7} {'IoU>=0.5':>9} {'one label':>9} {'split':>8} {'merged':>8} {'missed':>8}"
    )
    for name in ("face", "interior"):
        g = s[name]
        n = max(g["n"], 1)
        print(f"{'crossing a block face' if name == 'face' else 'interior':<22} {g['n']:>7} "
              f"{100 * g['matched'] / n:>8.2f}% {100 * g['one_label'] / n:>8.2f}% {100 * g['split'] / n:>7.3f}% "
              f"{100 * g['merged'] / n:>7.3f}% {100 * g['missed'] / n:>7.3f}%")  # fmt: skip
    ident = r.get("identity")
    if ident:
        print(f"\nidentity on a {ident['crop_shape']} crop, blocks {ident['block']}: "
              f"2 workers == in-process blocks: {ident['distributed_equals_in_process_blocks']}; "
              f"== segment_instances (untiled) up to renumbering: {ident['equals_segment_instances_untiled']} "
              f"(foreground voxels differing {ident['foreground_voxels_differing_from_untiled']:.2e}); "
              f"F1@0.5 vs segment_instances' tiled path {ident['f1_vs_segment_instances_tiled']:.4f} "
              f"(untiled vs tiled {ident['f1_untiled_vs_tiled']:.4f}); objects {ident['n_objects']}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="volume size / 8.4 GB (default 1)")
    parser.add_argument("--block", type=int, default=128, help="block core side, voxels (default 128)")
    parser.add_argument("--min-worker-gb", type=float, default=0.75, help="floor of the cap per worker")
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=None,
        help="the run's memory cap: client + workers (default 4 GB x scale, floored as above)",
    )
    parser.add_argument(
        "--worker-gb",
        type=float,
        default=None,
        help="dask memory_limit per worker, enforced by its nanny (default cap / workers)",
    )
    parser.add_argument("--no-identity", action="store_true", help="skip the in-memory identity check")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="instead of --scale"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="folder to keep the data in (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    import zarr

    shape = tuple(args.shape) if args.shape else volume_shape(args.scale, args.block)
    vol = 4 * float(np.prod(shape))
    cap = max(FULL_CAP_GB * 1e9 * args.scale, args.min_worker_gb * 1e9 * max(args.workers))
    if args.cap_gb is not None:
        cap = args.cap_gb * 1e9
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        objects = write_volume(tmp / "bench.zarr", tmp / "gt.zarr", shape, args.block, args.seed)
        print(f"wrote {shape} ({_gb(vol)}, {len(objects['radius'])} objects) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)  # fmt: skip
        r = {
            "shape": list(shape),
            "volume_bytes": vol,
            "cap_bytes": cap,
            "block": args.block,
            "n_objects": int(len(objects["radius"])),
            "n_crossing": int(objects["crossing"].sum()),
            "loadavg": os.getloadavg(),
            "runs": [],
        }
        gt = zarr.open_array(str(tmp / "gt.zarr"), mode="r")
        for n in args.workers:
            out = tmp / "bench.zarr" / "labels" / f"w{n}"
            extra = None
            if n == max(args.workers) and not args.no_identity:
                crop_shape = tuple(min(s, c) for s, c in zip(shape, (96, 128, 128)))
                crop = np.asarray(
                    zarr.open_array(str(tmp / "bench.zarr" / "s0"))[tuple(slice(0, c) for c in crop_shape)]
                )
                half = tuple(max(32, c // 2) for c in crop_shape)

                def extra(client, crop=crop, half=half):
                    return identity_check(client, crop, half, tmp / "identity")

            worker_cap = args.worker_gb * 1e9 if args.worker_gb is not None else cap / n
            try:
                run = run_workers(n, tmp / "bench.zarr", out, args.block, worker_cap, extra)
            except Exception as exc:  # e.g. a worker above its memory limit: the other rows still run
                print(f"{n} worker(s): FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                r.setdefault("failed", []).append({"workers": n, "error": f"{type(exc).__name__}: {exc}"})
                continue
            pred = zarr.open_array(str(out / "s0"), mode="r")
            run["score"] = score(gt, pred, objects)
            identity = run.pop("extra")
            if identity is not None:
                r["identity"] = identity
            r["runs"].append(run)
            print(f"{n} worker(s): {run['wall_s']:.1f} s, F1 {run['score']['f1']:.4f}", file=sys.stderr)
            if args.json:  # row by row, so that a later failure loses nothing
                Path(args.json).write_text(json.dumps(r, indent=1, default=float))
        r["client_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if r["runs"]:
            report(r)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1, default=float))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
