"""Issue 12.12: trained models stay listed across napari restarts, until 'remove'."""

from __future__ import annotations

import json
from pathlib import Path

from napari_mae.widgets._registry import Registry, registry


def test_registry_file_is_in_the_test_folder(config_dir):
    assert registry.path == config_dir / "models.json"
    assert not str(registry.path).startswith(str(Path.home() / ".config"))


def test_trained_models_survive_a_restart(config_dir, tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read here")
    name = registry.add_model("trained: run/best.pt", str(ckpt), patch_size=(16, 16))
    registry.add_model("session only", object())  # a model object is not written
    again = registry.add_model("trained: run/best.pt (resumed)", str(ckpt))
    assert again == name  # the same file is listed once
    saved = json.loads((config_dir / "models.json").read_text())["models"]
    assert saved == [{"name": name, "path": str(ckpt), "patch_size": [16, 16]}]
    restarted = Registry()
    assert restarted.model_names() == ["default-2d", "default-3d", name]
    assert restarted.patch_sizes[name] == (16, 16)
    ckpt.unlink()  # a deleted checkpoint is no longer listed
    assert Registry().model_names() == ["default-2d", "default-3d"]


def test_model_picker_lists_and_removes(viewer, add_widget, config_dir, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"x")
    (config_dir).mkdir(parents=True, exist_ok=True)
    (config_dir / "models.json").write_text(
        json.dumps({"models": [{"name": "trained: old", "path": str(ckpt), "patch_size": None}]})
    )
    registry.clear()  # as at napari start: the file is read on first use
    widget = add_widget("Reconstruction")
    picker = widget.model
    assert picker.combo.findText("trained: old") >= 0
    assert picker.combo.currentText() == "default-2d"  # an earlier session's model is not forced
    assert not picker.remove.isVisibleTo(picker)
    picker.combo.setCurrentText("trained: old")
    assert picker.remove.isVisibleTo(picker)
    picker.remove.click()
    assert picker.combo.findText("trained: old") < 0
    assert json.loads((config_dir / "models.json").read_text())["models"] == []
    assert ckpt.is_file()  # the checkpoint itself is kept
