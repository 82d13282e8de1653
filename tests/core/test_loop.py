"""The objective-agnostic training loop (napari_mae.training.loop) on a toy objective."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_mae.io.checkpoint import load_checkpoint
from napari_mae.training.loop import LoopConfig, _Dist, _resolve_device, lr_at_step, run

sys.path.insert(0, str(Path(__file__).parent))
from toy_objective import ToyObjective  # noqa: E402


def _cfg(out, **kw) -> LoopConfig:
    base = dict(
        epochs=3, batch_size=4, lr=0.05, warmup_fraction=0.2, checkpoint_every=0, device="cpu", seed=3
    )
    return LoopConfig(output_dir=out, **{**base, **kw})


def test_toy_objective_trains_and_keeps_best_by_its_metric(tmp_path):
    out = tmp_path / "run"
    updates = list(run(ToyObjective(), _cfg(out)))
    kinds = [u.kind for u in updates]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("epoch") == 3
    assert "a toy regression" in updates[0].message
    epochs = [u for u in updates if u.kind == "epoch"]
    assert set(epochs[0].metrics) == {"acc", "mse"} and epochs[0].val_loss is None
    assert "validation accuracy" in epochs[0].message
    steps = [u for u in updates if u.kind == "step"]
    assert len(steps) == 9 and "extra_loss" in steps[0].metrics
    assert steps[-1].loss < steps[0].loss
    # best.pt: the epoch with the highest accuracy (ties: the first), not the lowest loss
    accs = [u.metrics["acc"] for u in epochs]
    best_epoch = accs.index(max(accs)) + 1
    state = load_checkpoint(out / "best.pt")["training_state"]
    assert state["epoch"] == best_epoch and state["metric"] == "acc" and state["higher_is_better"]
    assert f"best validation accuracy {max(accs):.4f}" in updates[-1].message
    with (out / "loss_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "epoch", "loss", "acc", "mse", "lr", "images_per_s", "elapsed_s"]
    assert [r["acc"] != "" for r in rows] == [False, False, True] * 3


def test_toy_objective_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    list(run(ToyObjective(), _cfg(full)))
    cut = tmp_path / "cut"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] == 5  # before the 5th step, mid-epoch 2

    kinds = [u.kind for u in run(ToyObjective(), _cfg(cut), stop=stop)]
    assert kinds[-1] == "stopped"
    objective = ToyObjective()
    list(run(objective, _cfg(cut, resume=True)))
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(cut / "last.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    extra_a, extra_b = a["training_state"]["objective"], b["training_state"]["objective"]
    for key in extra_a["extra"]:
        assert torch.equal(extra_a["extra"][key], extra_b["extra"][key]), key
    assert extra_a["extra_opt"]["state"][0]["momentum_buffer"].equal(
        extra_b["extra_opt"]["state"][0]["momentum_buffer"]
    )
    assert a["training_state"]["best_metric"] == b["training_state"]["best_metric"]


def test_objective_metric_must_be_one_of_its_metrics(tmp_path):
    objective = ToyObjective()
    objective.metric = "dice"
    with pytest.raises(ValueError, match="'dice' is not one of its metrics"):
        list(run(objective, _cfg(tmp_path / "run")))


def test_auto_device_picks_mps_when_there_is_no_cuda(monkeypatch):
    # The loop had its own copy of the device choice, whose "auto" never picked MPS.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _resolve_device("auto", _Dist()).type == "mps"


_DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from toy_objective import ToyObjective
from napari_mae.training.loop import LoopConfig, run

cfg = LoopConfig(output_dir={out!r}, epochs=2, batch_size=2, lr=0.05, checkpoint_every=0, device="cpu", seed=3)
for update in run(ToyObjective(n_train=8, n_val=3), cfg):
    print(update.kind, update.step, update.message, file=sys.stderr)
"""


def test_toy_objective_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "toy_ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 only; 8 samples / 2 processes / batch 2 = 2 steps x 2 epochs
    assert proc.stderr.count("finished 4 steps") == 1
    assert "x 2 processes" in proc.stderr
    state = load_checkpoint(out / "last.pt")["training_state"]
    assert state["world_size"] == 2 and state["step"] == 4 and "extra_opt" in state["objective"]


def test_resume_with_more_epochs_follows_the_new_schedule_and_keeps_elapsed(tmp_path, monkeypatch):
    # epochs 2 then --epochs 4 --resume: the first resumed step must use the new schedule's rate
    # at that step (not the old schedule's end value, 0), and elapsed_s must go on, not restart.
    # Saves are slowed down: the checkpoint's elapsed_s was taken before the save and the last
    # row's after it, so the resumed rows could start below it (a CI run failed by chance).
    import time

    import napari_mae.io.checkpoint as checkpoint

    real_save = checkpoint.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(0.05)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    out = tmp_path / "run"
    list(run(ToyObjective(), _cfg(out, epochs=2)))
    with pytest.warns(UserWarning, match="total steps"):
        list(run(ToyObjective(), _cfg(out, epochs=4, resume=True)))
    with (out / "loss_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    total = 12
    for r in rows[6:]:
        s = int(r["step"]) - 1  # the 0-based step the row's lr was used for
        want = lr_at_step(s, total, lr=0.05, warmup_steps=round(0.2 * total))
        assert float(r["lr"]) == pytest.approx(want, rel=1e-5), r
    assert float(rows[6]["lr"]) > 0.0
    assert float(rows[6]["elapsed_s"]) >= float(rows[5]["elapsed_s"])
