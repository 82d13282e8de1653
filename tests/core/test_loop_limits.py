"""The training loop's time and step limits (LoopConfig.max_seconds / max_steps)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from napari_mae.io.checkpoint import load_checkpoint
from napari_mae.training.loop import LoopConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from toy_objective import ToyObjective  # noqa: E402


def _cfg(out, **kw) -> LoopConfig:
    base = dict(epochs=50, batch_size=4, lr=0.05, checkpoint_every=0, device="cpu", seed=3)
    return LoopConfig(output_dir=out, **{**base, **kw})


def test_step_limit_ends_mid_epoch_with_an_evaluated_checkpoint(tmp_path):
    out = tmp_path / "run"
    updates = list(run(ToyObjective(), _cfg(out, max_steps=5)))  # 3 steps per epoch
    kinds = [u.kind for u in updates]
    assert kinds[-1] == "finished" and kinds.count("step") == 5
    # the second epoch ended after its 2nd step: validated and checkpointed there
    assert kinds.count("epoch") == 2
    assert "step limit (5 steps)" in updates[-1].message
    assert load_checkpoint(out / "last.pt")["training_state"]["step"] == 5
    assert (out / "best.pt").is_file()


class _SlowObjective(ToyObjective):
    def training_step(self, batch, ctx):
        time.sleep(0.05)
        return super().training_step(batch, ctx)


def test_time_limit_ends_the_run(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    updates = list(run(_SlowObjective(), _cfg(out, max_seconds=1.0)))
    took = time.perf_counter() - t0
    steps = [u for u in updates if u.kind == "step"]
    assert updates[-1].kind == "finished" and "time limit (1 s)" in updates[-1].message
    assert 1 <= len(steps) < 150  # 50 epochs x 3 steps would take >= 7.5 s
    assert took < 5.0
    assert load_checkpoint(out / "last.pt")["training_state"]["step"] == len(steps)


def test_stop_still_wins_over_a_limit(tmp_path):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 3  # before the 3rd step, when the step limit is reached too

    updates = list(run(ToyObjective(), _cfg(tmp_path / "run", max_steps=2), stop=stop))
    assert updates[-1].kind == "stopped" and updates[-1].step == 2


@pytest.mark.parametrize(
    "kw", [{"max_seconds": 0}, {"max_seconds": float("inf")}, {"max_steps": 0}, {"max_steps": 2.5}]
)
def test_bad_limits_raise(tmp_path, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LoopConfig(output_dir=tmp_path, **kw)


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"min_lr": 1.0}, {"weight_decay": -1.0},
     {"warmup_fraction": 1.0}, {"grad_clip": 0.0}, {"num_workers": -1}, {"checkpoint_every": -1}],
)  # fmt: skip
def test_the_loop_fields_are_checked_once_for_every_config(tmp_path, bad):
    """LoopConfig, TrainConfig and SegmentationConfig refuse the same bad loop settings alike."""
    from napari_mae.training.config import TrainConfig
    from napari_mae.training.loop import LoopConfig
    from napari_mae.training.segmentation import SegmentationConfig

    name = next(iter(bad))
    messages = []
    for make in (
        lambda: LoopConfig(output_dir=tmp_path, **bad),
        lambda: TrainConfig(data_dir=tmp_path, output_dir=tmp_path, **bad).validate(),
        lambda: SegmentationConfig(
            data_dir=tmp_path, labels_dir=tmp_path, output_dir=tmp_path, **bad
        ).validate(),
    ):
        with pytest.raises(ValueError, match=name) as err:
            make()
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages  # one check, one message
