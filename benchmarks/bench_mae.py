"""Benchmarks of the MAE core: training-step speed-up from masking, reconstruction throughput and memory.

Prints, measured in one run:

1. Training-step time (forward + loss + backward + AdamW step) of the same model
   at ``mask_ratio`` 0.75 and 0.0, and their ratio. The encoder sees only the
   visible 25 % of tokens, so the paper (He et al. 2021, sec. 4 and tab. 2)
   expects a 2.8-4.1x speed-up; the target here is >= 2.5x.
2. Reconstruction (:func:`napari_mae.reconstruction.reconstruct`) throughput
   in megapixels/s (2D, 4096 x 4096) and megavoxels/s (3D, 256 x 512 x 512),
   with the peak memory it needed beyond the input, against the target of
   3x the input size plus the model. Each case runs in a fresh process so the
   resident set size (sampled every millisecond) belongs to it alone; numpy's
   own peak is also traced (``tracemalloc``). On CUDA the peak GPU memory is
   printed too.

Usage::

    python benchmarks/bench_mae.py            # full sizes, CPU (several minutes on 2 cores)
    python benchmarks/bench_mae.py --quick    # 1024 x 1024 and 64 x 256 x 256
    python benchmarks/bench_mae.py --device cuda   # bf16 autocast on the GPU

Untrained presets are used (``tiny-2d``, ``tiny-3d``): speed and memory do
not depend on the weights.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set size every millisecond in a thread; ``peak`` is the highest seen.

    ``ru_maxrss`` is a lifetime high-water mark that imports and warm-up can
    already have pushed above anything the measured call does.
    """

    def __init__(self) -> None:
        import threading

        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def bench_training(preset: str, batch_size: int, steps: int, device_name: str, threads: int | None) -> dict:
    """Median step time at mask_ratio 0.75 and 0.0, interleaved so both see the same load."""
    import torch

    from napari_mae.models.mae import build_model, resolve_device

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.config
    x = torch.rand(batch_size, cfg.in_channels, *cfg.img_size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda"

    def step(ratio: float) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred, mask = model(x, generator=generator, mask_ratio=ratio)
        loss = model.loss(x, pred.float(), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - start

    for ratio in (0.75, 0.0):  # warm-up
        step(ratio)
        step(ratio)
    times: dict[float, list[float]] = {0.75: [], 0.0: []}
    for _ in range(steps):
        for ratio in (0.75, 0.0):
            times[ratio].append(step(ratio))
    t75, t0 = statistics.median(times[0.75]), statistics.median(times[0.0])
    return {
        "preset": preset,
        "batch": batch_size,
        "device": str(device),
        "t75": t75,
        "t0": t0,
        "ratio": t0 / t75,
    }


def _make_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """float32 image filled plane by plane (no float64 temporary to inflate the RSS high-water mark)."""
    rng = np.random.default_rng(seed)
    image = np.empty(shape, dtype=np.float32)
    for i in range(shape[0]):
        image[i] = rng.random(shape[1:], dtype=np.float32)
    image *= 1000.0
    return image


def _recon_case(args: tuple) -> dict:
    """One reconstruction, in its own process."""
    preset, shape, device_name, batch_size, threads = args
    import torch

    from napari_mae.models.mae import load_model, resolve_device
    from napari_mae.reconstruction import reconstruct

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = load_model(preset, device=device)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    warm = _make_image(tuple(min(s, 2 * r) for s, r in zip(shape, model.config.img_size)))
    reconstruct(warm, model, device=device, batch_size=batch_size)  # load kernels, allocate pools
    del warm
    image = _make_image(shape)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    tracemalloc.start()
    with _PeakRSS() as during_call:
        start = time.perf_counter()
        result = reconstruct(image, model, device=device, batch_size=batch_size, seed=0)
        elapsed = time.perf_counter() - start
    traced_call = tracemalloc.get_traced_memory()[1]
    with _PeakRSS() as with_outputs:
        _ = (result.mask, result.masked, result.error)  # materialise the lazy outputs too
    traced_all = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    gpu_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {
        "preset": preset,
        "shape": shape,
        "device": str(device),
        "seconds": elapsed,
        "n": int(np.prod(shape)),
        "input_bytes": image.nbytes,
        "model_bytes": model_bytes,
        "rss_call": during_call.peak - rss0,
        "rss_all": max(during_call.peak, with_outputs.peak) - rss0,
        "traced_call": traced_call,
        "traced_all": traced_all,
        "gpu_peak": gpu_peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (1024^2, 64x256x256), fewer steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per ratio")
    parser.add_argument("--window-batch", type=int, default=16, help="windows per forward in reconstruct")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-recon", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 10)
    import torch

    print(f"napari-mae benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}")
    if not args.skip_train:
        print("\n== training step, mask_ratio 0.75 vs 0.0 (same model, interleaved, median) ==")
        for preset in ("tiny-2d",) if args.quick else ("tiny-2d", "tiny-3d"):
            batch = args.batch_size if preset.endswith("2d") else max(1, args.batch_size // 4)
            r = bench_training(preset, batch, steps, args.device, args.threads)
            verdict = "ok" if r["ratio"] >= 2.5 else "BELOW 2.5x TARGET"
            print(
                f"{r['preset']:>8} batch {r['batch']:>3} on {r['device']}: 0.75 -> {1e3 * r['t75']:7.1f} ms/step, "
                f"0.0 -> {1e3 * r['t0']:7.1f} ms/step, speed-up {r['ratio']:.2f}x ({verdict})"
            )
    if not args.skip_recon:
        print("\n== reconstruction, mask_ratio 0.75, fresh process per case ==")
        cases = (
            [("tiny-2d", (1024, 1024)), ("tiny-3d", (64, 256, 256))]
            if args.quick
            else [("tiny-2d", (4096, 4096)), ("tiny-3d", (256, 512, 512))]
        )
        ctx = mp.get_context("spawn")
        for preset, shape in cases:
            with ctx.Pool(1) as pool:
                r = pool.apply(_recon_case, ((preset, shape, args.device, args.window_batch, args.threads),))
            unit = "MPix/s" if len(shape) == 2 else "MVox/s"
            budget = 3 * r["input_bytes"] + r["model_bytes"]
            verdict = "ok" if r["rss_call"] <= budget else "OVER 3x TARGET"
            print(
                f"{r['preset']:>8} {'x'.join(map(str, shape)):>13} float32 ({r['input_bytes'] / MIB:.0f} MiB) on "
                f"{r['device']}: {r['seconds']:.1f} s, {r['n'] / 1e6 / r['seconds']:.2f} {unit}"
            )
            print(
                f"{'':>10}peak extra RSS during reconstruct {r['rss_call'] / MIB:.0f} MiB = "
                f"{r['rss_call'] / r['input_bytes']:.2f}x input (target 3x input + model = {budget / MIB:.0f} MiB: "
                f"{verdict}); numpy traced peak {r['traced_call'] / MIB:.0f} MiB"
            )
            print(
                f"{'':>10}after also materialising mask, masked, error: RSS {r['rss_all'] / MIB:.0f} MiB = "
                f"{r['rss_all'] / r['input_bytes']:.2f}x input; numpy traced {r['traced_all'] / MIB:.0f} MiB"
                + (f"; GPU peak {r['gpu_peak'] / MIB:.0f} MiB" if r["gpu_peak"] else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
