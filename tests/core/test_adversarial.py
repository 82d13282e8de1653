"""The adversarial term: its setting, the discriminator trained alongside the MAE, resume."""

from __future__ import annotations

import math

import pytest

from napari_mae.cli import main
from napari_mae.training.config import TrainConfig


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf])
def test_train_config_rejects_bad_adversarial_weight(tmp_path, weight):
    config = TrainConfig(data_dir=tmp_path, output_dir=tmp_path / "run", adversarial_weight=weight)
    with pytest.raises(ValueError, match="adversarial_weight must be a finite number >= 0"):
        config.validate()


def test_train_config_adversarial_weight_defaults_off_and_is_saved(tmp_path):
    config = TrainConfig(data_dir=tmp_path, output_dir=tmp_path / "run")
    assert config.adversarial_weight == 0.0
    config.validate()
    assert TrainConfig(data_dir=tmp_path, output_dir=tmp_path, adversarial_weight=0.1).to_json()[
        "adversarial_weight"
    ] == pytest.approx(0.1)


def test_cli_passes_adversarial_weight(tmp_path, monkeypatch):
    import napari_mae.training as training

    seen = {}

    def fake_train(config, **kw):
        seen["config"] = config
        return iter(())

    monkeypatch.setattr(training, "train", fake_train)
    args = ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--model", "tiny-2d", "--quiet"]
    assert main([*args, "--adversarial-weight", "0.01"]) == 0
    assert seen["config"].adversarial_weight == pytest.approx(0.01)
    assert main(args) == 0
    assert seen["config"].adversarial_weight == 0.0


def test_cli_rejects_negative_adversarial_weight(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    code = main(
        ["train", str(folder), "--out", str(tmp_path / "run"), "--adversarial-weight", "-1", "--quiet"]
    )
    assert code == 2
    assert "adversarial_weight must be" in capsys.readouterr().err


def test_cli_refuses_adversarial_weight_for_the_segmentation_task(tmp_path, capsys):
    args = ["train", str(tmp_path), "--labels", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main([*args, "--adversarial-weight", "0.1", "--quiet"]) == 2
    assert "--adversarial-weight is for the MAE task" in capsys.readouterr().err


# ---------------------------------------------------------------- the discriminator in training

import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from napari_mae.io.checkpoint import load_checkpoint  # noqa: E402
from napari_mae.models.mae import build_model, load_model  # noqa: E402
from napari_mae.training import train  # noqa: E402
from napari_mae.training.loop import StepContext  # noqa: E402
from napari_mae.training.objectives import _Adversary  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_training import TINY, write_real_images  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_real_images(tmp_path / "images")


def _config(image_folder, out, **kw) -> TrainConfig:
    base = {
        "data_dir": image_folder,
        "output_dir": out,
        "model": TINY,
        "epochs": 2,
        "batch_size": 2,
        "val_fraction": 0.2,
        "checkpoint_every": 0,
        "seed": 7,
        "lr": 2e-3,
        "device": "cpu",
        "adversarial_weight": 0.1,
    }
    base.update(kw)
    return TrainConfig(**base)


def _adversary_state(path: Path) -> dict:
    return load_checkpoint(path)["training_state"]["objective"]["adversary"]


def _flat(state) -> dict:
    """Every tensor of a nested state dict, keyed by its path."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}/{k}", w)
        elif isinstance(v, (list, tuple)):
            for i, w in enumerate(v):
                walk(f"{prefix}/{i}", w)
        elif torch.is_tensor(v):
            out[prefix] = v

    walk("", state)
    return out


def test_adversarial_run_trains_a_discriminator_kept_out_of_the_model(image_folder, tmp_path):
    out = tmp_path / "run"
    updates = list(train(_config(image_folder, out)))
    assert updates[-1].kind == "finished"
    steps = [u for u in updates if u.kind == "step"]
    assert len(steps) == 6
    for u in steps:
        assert {"mse", "adversarial", "d_loss"} <= set(u.metrics)
        assert all(math.isfinite(u.metrics[k]) for k in ("mse", "adversarial", "d_loss"))
        # the training loss is the MAE loss plus the weighted generator term
        assert u.loss == pytest.approx(u.metrics["mse"] + 0.1 * u.metrics["adversarial"], rel=1e-5)
    # the discriminator trained: its weights moved away from its (seeded) initial ones
    fresh = _Adversary(build_model(TINY), torch.device("cpu"), 7, 1.0).net.state_dict()
    trained = _adversary_state(out / "last.pt")["discriminator"]
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    assert _adversary_state(out / "last.pt")["optimizer"]["state"]  # Adam moments kept
    # the checkpoints are plain model checkpoints (weights_only load); the model has no weight of its own
    for name in ("last.pt", "best.pt"):
        model = load_model(str(out / name))
        assert model.config.adversarial_weight == 0.0
        assert not any("discriminator" in k for k in model.state_dict())


def test_adversarial_term_changes_training(image_folder, tmp_path):
    a, b = tmp_path / "w0", tmp_path / "w01"
    list(train(_config(image_folder, a, adversarial_weight=0.0, epochs=1)))
    list(train(_config(image_folder, b, epochs=1)))
    sa, sb = load_model(str(a / "last.pt")).state_dict(), load_model(str(b / "last.pt")).state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())
    assert "adversary" not in load_checkpoint(a / "last.pt")["training_state"]["objective"]


def test_adversarial_stop_and_resume_equals_uninterrupted(image_folder, tmp_path):
    import threading

    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    list(train(_config(image_folder, ref_out)))  # 6 steps
    stop = threading.Event()
    for u in train(_config(image_folder, cut_out), stop=stop):
        if u.kind == "step" and u.step == 3:
            stop.set()
    assert load_checkpoint(cut_out / "last.pt")["training_state"]["step"] == 3
    resumed = list(train(_config(image_folder, cut_out, resume=True)))
    assert resumed[-1].kind == "finished"

    ref_model, cut_model = (load_model(str(p / "last.pt")).state_dict() for p in (ref_out, cut_out))
    for k in ref_model:
        assert torch.equal(ref_model[k], cut_model[k]), k
    ref_adv, cut_adv = (_flat(_adversary_state(p / "last.pt")) for p in (ref_out, cut_out))
    assert ref_adv.keys() == cut_adv.keys() and any("discriminator" in k for k in ref_adv)
    for k in ref_adv:
        assert torch.equal(ref_adv[k], cut_adv[k]), k


def test_resume_with_another_adversarial_setting(image_folder, tmp_path):
    out = tmp_path / "run"
    stop = threading_event_after(2)
    list(train(_config(image_folder, out, adversarial_weight=0.0), stop=stop))
    with pytest.raises(ValueError, match="trained without the adversarial term"):
        list(train(_config(image_folder, out, resume=True)))
    out2 = tmp_path / "run2"
    list(train(_config(image_folder, out2), stop=threading_event_after(2)))
    with pytest.warns(UserWarning, match="discriminator is dropped"):
        list(train(_config(image_folder, out2, resume=True, adversarial_weight=0.0)))


def threading_event_after(n_calls: int):
    """A stop callable that turns true at its ``n_calls + 1``-th call (after ``n_calls`` steps)."""
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > n_calls

    return stop


def test_model_config_weight_is_refused_when_it_disagrees(image_folder, tmp_path):
    conf = dataclasses.replace(TINY, adversarial_weight=0.5)
    with pytest.raises(ValueError, match="set that instead"):
        list(train(_config(image_folder, tmp_path / "run", model=conf)))


# ---------------------------------------------------------------- one discriminator step


class _FakeDist:
    """Stands for the loop's process group: records and rewrites the averaged gradients."""

    def __init__(self, rewrite=None):
        self.calls = []
        self.rewrite = rewrite

    def average_gradients(self, parameters) -> None:
        params = list(parameters)
        self.calls.append(params)
        if self.rewrite is not None:
            for p in params:
                p.grad.copy_(self.rewrite(p.grad))


def _step_setup(amp_dtype=None, rewrite=None, grad_clip=1.0):
    torch.manual_seed(0)
    model = build_model(TINY)
    adversary = _Adversary(model, torch.device("cpu"), 0, grad_clip)
    dist = _FakeDist(rewrite)
    ctx = StepContext(
        net=model,
        device=torch.device("cpu"),
        step=0,
        epoch=0,
        rank=0,
        world_size=2,
        generator=torch.Generator().manual_seed(1),
        amp_dtype=amp_dtype,
        _dist=dist,
    )
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pred, mask = model(x, generator=ctx.generator)
    return model, adversary, dist, ctx, x, pred.float(), mask


def _d_params(adversary):
    return [p.detach().clone() for p in adversary.net.parameters()]


def test_discriminator_gradients_are_averaged_and_generator_term_leaves_them():
    model, adversary, dist, ctx, x, pred, mask = _step_setup()
    before = _d_params(adversary)
    loss, applied = adversary.step(model, x, pred, mask, ctx)
    assert applied and math.isfinite(loss)
    # one all-reduce over exactly the discriminator's parameters
    assert len(dist.calls) == 1
    assert [id(p) for p in dist.calls[0]] == [id(p) for p in adversary.net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, _d_params(adversary), strict=True))
    # the generator term's backward reaches the MAE, not the discriminator
    g = adversary.generator_loss(model, x, pred, mask, ctx)
    g.backward()
    assert all(p.grad is None for p in adversary.net.parameters())
    assert any(p.grad is not None for p in model.parameters())


def test_discriminator_applies_the_averaged_gradients():
    # were its own (unaveraged) gradients applied, the weights would move; zeroed ones leave Adam still
    model, adversary, _, ctx, x, pred, mask = _step_setup(rewrite=torch.zeros_like)
    before = _d_params(adversary)
    adversary.step(model, x, pred, mask, ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, _d_params(adversary), strict=True))


def test_nonfinite_discriminator_gradient_skips_its_update():
    model, adversary, _, ctx, x, pred, mask = _step_setup(rewrite=lambda g: g * math.nan)
    before = _d_params(adversary)
    _, applied = adversary.step(model, x, pred, mask, ctx)
    assert not applied
    assert all(torch.equal(a, b) for a, b in zip(before, _d_params(adversary), strict=True))


def test_discriminator_gradients_are_clipped(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kw):
        params = list(params)
        norm = real(params, max_norm, *args, **kw)
        seen.append((max_norm, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model, adversary, _, ctx, x, pred, mask = _step_setup(grad_clip=1e-3)
    adversary.step(model, x, pred, mask, ctx)
    assert seen and seen[0][0] == 1e-3 and seen[0][1] <= 1e-3 * 1.001


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_discriminator_step_under_autocast(dtype):
    model, adversary, _, ctx, x, pred, mask = _step_setup(amp_dtype=dtype)
    # float16: the scaler's first scales (from 2**16) may overflow; those steps are skipped
    for _ in range(20):
        before = _d_params(adversary)
        loss, applied = adversary.step(model, x, pred, mask, ctx)
        assert math.isfinite(loss)
        moved = any(not torch.equal(a, b) for a, b in zip(before, _d_params(adversary), strict=True))
        assert moved == applied
        if applied:
            break
    assert applied
    assert adversary.scaler.is_enabled() == (dtype == torch.float16)
    g = adversary.generator_loss(model, x, pred, mask, ctx)
    assert g.dtype == torch.float32 and torch.isfinite(g)
    state = adversary.state_dict()
    assert bool(state["scaler"]) == (dtype == torch.float16)
    # a restored scaler state is applied at the next step
    other = _Adversary(model, torch.device("cpu"), 0, 1.0)
    other.load_state_dict(state)
    other.step(model, x, pred, mask, ctx)
    if dtype == torch.float16:
        assert other.scaler.get_scale() == pytest.approx(adversary.scaler.get_scale())
