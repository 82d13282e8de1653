"""One statement of the object-radius priority, used by segment_instances and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import five_nuclei

from napari_mae.segmentation import segment as segment_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Net:
    def __init__(self, fitted):
        self.fitted_radius = fitted


@pytest.mark.parametrize(
    ("given", "net", "expected"),
    [
        (4.0, _Net(7.0), (4.0, "given")),  # given beats the model's fitted radius
        (4.0, None, (4.0, "given")),
        (None, _Net(7.0), (7.0, "model")),
        (None, _Net(None), None),  # an MAE-born model without a fitted radius: estimate
        (None, None, None),
    ],
)
def test_fixed_object_radius_table(given, net, expected):
    assert segment_module.fixed_object_radius(given, net) == expected


def test_segment_and_finetune_follow_the_one_rule(monkeypatch):
    """Changing the rule changes both callers: the priority is stated once."""
    from napari_mae.models import mae
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder
    from napari_mae.segmentation.finetune import FinetuneConfig, _prepare, _spacings, check_finetune_inputs

    monkeypatch.setattr(segment_module, "fixed_object_radius", lambda r, net=None: (5.5, "model"))
    img, gt = five_nuclei()
    _, info = segment_module.segment_instances(img, method="classical")
    assert info["radius"] == 5.5 and info["radius_source"] == "model"

    torch.manual_seed(0)
    net = InstanceDecoder(mae.build_model("tiny-2d"), DecoderConfig(features=4, object_radius=6.0))
    strokes = np.zeros(gt.shape, np.uint8)
    strokes[20, 16:25] = 2
    strokes[5, 5:40] = 1
    imgs, s, c = check_finetune_inputs(img, strokes, None)
    cfg = FinetuneConfig(seconds=None, steps=1, crop_size=64, device="cpu")
    prep = _prepare(net, imgs, s, c, _spacings(None, imgs, None), None, None, cfg, lambda: None)
    assert prep.radii == [5.5] and prep.sources == ["model"]
