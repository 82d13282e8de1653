"""Checkpoints (napari_mae.io.checkpoint)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import stat
import sys

import pytest
import torch

from napari_mae.io import checkpoint as ckpt
from napari_mae.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_mae.models.mae import MAEConfig, build_model, load_model, model_from_checkpoint

MICRO = MAEConfig(img_size=(32, 32), patch_size=(8, 8), embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, name="micro")  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Touch:
    """Unpickling this calls Path.touch: a stand-in for code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(MICRO)


def test_round_trip(tmp_path, model):
    opt = torch.optim.AdamW(model.parameters())
    x = torch.rand(2, 1, 32, 32)
    pred, mask = model(x)
    model.loss(x, pred, mask).backward()
    opt.step()
    norm = {"method": "percentile", "lower": 2.0, "upper": 99.0}
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    path = save_checkpoint(
        tmp_path / "sub" / "m.pt", model, normalization=norm, training_state=state, extra={"a": [1]}
    )
    data = load_checkpoint(path)
    assert data["config"] == MICRO.to_dict()
    assert data["normalization"] == norm
    assert data["training_state"]["step"] == 7 and data["extra"] == {"a": [1]}
    opt.load_state_dict(data["training_state"]["optimizer"])  # usable as is
    loaded = load_model(path)
    assert loaded.config == MICRO and loaded.normalization == norm and not loaded.training
    model.eval()
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, :5] = False
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:1], mask=mask)[0], model(x[:1], mask=mask)[0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]  # no temp file left


def test_save_is_atomic_on_failure(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", model, training_state={"step": 1})

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, training_state={"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["training_state"]["step"] == 1  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.fixture
def umask_027():
    """Set the process umask to 0o027 (not the usual 0o022/0o002), then restore it."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_file_mode_follows_umask(tmp_path, model, umask_027):
    path = save_checkpoint(tmp_path / "m.pt", model)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask_027  # 0o640, not mkstemp's 0o600
    path.chmod(0o600)
    save_checkpoint(path, model)  # overwriting: a new file, again with the umask's mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_unloadable_contents_are_refused_before_writing(tmp_path, model):
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "m.pt", model, extra={"obj": _Touch(tmp_path / "x")})
    assert list(tmp_path.iterdir()) == []


def test_code_bearing_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"config": MICRO.to_dict(), "state_dict": {}, "payload": _Touch(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a checkpoint at all", "not a readable torch checkpoint"),
        ({"state_dict": {}}, "not a napari-mae checkpoint"),
        ([1, 2, 3], "not a napari-mae checkpoint"),
        ({"config": {}, "state_dict": {}, "format": "other"}, "format"),
        ({"config": {}, "state_dict": {}, "version": 99}, "upgrade"),
    ],
)
def test_foreign_files_raise_checkpoint_error(tmp_path, content, match):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_invalid_config_or_weights(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model)
    data = load_checkpoint(path)
    bad = {**data, "config": {**data["config"], "embed_dim": 30}}
    with pytest.raises(CheckpointError, match="invalid model config"):
        model_from_checkpoint(bad)
    other = build_model(dataclasses.replace(MICRO, embed_dim=64, num_heads=2))
    mismatch = {**data, "state_dict": other.state_dict()}
    with pytest.raises(CheckpointError, match="weights do not fit"):
        model_from_checkpoint(mismatch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"spatial_dims": 3}, "is a 2D model .* image is 3D"), ({"in_channels": 3}, "takes 1 channel.* has 3")],
)
def test_wrong_kind_says_so(tmp_path, model, kwargs, match):
    data = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    with pytest.raises(ValueError, match=match):
        model_from_checkpoint(data, source="m.pt", **kwargs)


def test_ddp_wrapper_is_unwrapped(tmp_path, model):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    data = load_checkpoint(save_checkpoint(tmp_path / "m.pt", Wrapper(model)))
    assert not any(k.startswith("module.") for k in data["state_dict"])


def test_format_constant():
    assert ckpt.CHECKPOINT_FORMAT == "napari-mae-checkpoint"
