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

    def fake_train(config):
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
