"""Segmentation models a user trained are listed apart from the MAEs, across restarts."""

from __future__ import annotations

import json

from napari_mae.widgets._registry import SegmenterRegistry, registry, segmenters


def test_segmenters_have_their_own_file_and_list(config_dir, tmp_path):
    ckpt = tmp_path / "seg" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read here")
    name = segmenters.add_model("trained: seg/best.pt", str(ckpt))
    assert segmenters.path == config_dir / "segmenters.json"
    saved = json.loads(segmenters.path.read_text())["models"]
    assert [e["path"] for e in saved] == [str(ckpt)]
    # The MAE lists do not offer a segmentation checkpoint, and the other way round.
    assert name not in registry.model_names()
    assert not (config_dir / "models.json").exists()
    assert SegmenterRegistry().model_names() == ["default-2d", name]
    # The bundled name is never taken by a trained model.
    other = segmenters.add_model("default-2d", str(tmp_path / "x.pt"))
    assert other != "default-2d"
