"""The scale of a fine-tuned model: stored in its checkpoint, kept at inference, taken from strokes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk
from synthetic import five_nuclei

from napari_mae.segmentation.finetune import FinetuneConfig, check_finetune_inputs, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(seconds=None, steps=2, eval_every=2, batch_size=2, crop_size=64, live_every_s=0, device="cpu")


def _save_tiny(path, extra):
    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models import mae
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder

    torch.manual_seed(0)
    net = InstanceDecoder(mae.build_model("tiny-2d"), DecoderConfig(features=4, object_radius=6.0))
    save_checkpoint(path, net, normalization={"lower": 1.0, "upper": 99.8}, extra=extra)
    return path


def _strokes(gt):
    s = np.zeros(gt.shape, np.uint8)
    s[20, 16:25] = 2
    s[46, 44:53] = 2
    s[5, 5:40] = 1
    s[90, 40:90] = 1
    return s


def _prepared(net, images, scribbles, cfg, spacing=None, object_radius=None):
    from napari_mae.segmentation.finetune import _prepare, _spacings

    imgs, s, c = check_finetune_inputs(images, scribbles, None)
    return _prepare(net, imgs, s, c, _spacings(spacing, imgs, None), None, object_radius, cfg, lambda: None)


# ----------------------------------------------------------------------------- stored radius


def test_fitted_radius_reads_only_positive_numbers():
    from napari_mae.models.decoder import fitted_radius

    assert fitted_radius({"extra": {"object_radius": 3.5}}) == 3.5
    for bad in ({}, {"extra": None}, {"extra": {"object_radius": -1.0}}, {"extra": {"object_radius": "3"}},
                {"extra": {"object_radius": float("nan")}}, {"extra": {"object_radius": True}}):  # fmt: skip
        assert fitted_radius(bad) is None


def test_the_fine_tuned_checkpoint_stores_the_radius_it_trained_at(tiny_model, tmp_path):
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.models.decoder import load_segmenter

    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    list(
        finetune(
            img, _strokes(gt), out=out, model=tiny_model, object_radius=5.0, config=FinetuneConfig(**TINY)
        )
    )
    extra = load_checkpoint(out)["extra"]
    assert extra["object_radius"] == 5.0 and extra["object_radii"] == [5.0]
    assert load_segmenter(out).fitted_radius == 5.0
    assert load_segmenter(tiny_model).fitted_radius is None


def test_a_fine_tuned_model_segments_at_its_fitted_radius(tmp_path, monkeypatch):
    """No per-image estimate, and in 3D no re-estimate from planes: the scale it trained at."""
    import napari_mae.segmentation.learned as learned
    import napari_mae.segmentation.segment as segment
    from napari_mae.segmentation import segment_instances

    def no_estimate(*a, **k):
        raise AssertionError("the radius of a fine-tuned model must not be estimated")

    path = _save_tiny(tmp_path / "fitted.pt", {"task": "segmentation", "object_radius": 4.0})
    monkeypatch.setattr(segment, "estimate_object_radius", no_estimate)
    monkeypatch.setattr(learned, "_radius_from_planes", no_estimate)
    img, _ = five_nuclei()
    _, info = segment_instances(img, method="learned", model=path)
    assert info["radius"] == 4.0 and info["radius_source"] == "model"
    vol = np.stack([img[:64, :64]] * 8).astype(np.float32)
    _, info = segment_instances(vol, method="learned", model=path, spacing=(1.0, 1.0, 1.0))
    assert info["radius"] == 4.0 and info["radius_planes"] is None
    np.testing.assert_allclose(info["scale"], 6.0 / 4.0, rtol=0.05)
    # a radius the caller gives still wins
    _, info = segment_instances(img, method="learned", model=path, object_radius=6.0)
    assert info["radius"] == 6.0 and info["radius_source"] == "given"


def test_a_fine_tuned_model_fine_tuned_again_keeps_its_radius(tmp_path):
    from napari_mae.models.decoder import load_segmenter

    net = load_segmenter(_save_tiny(tmp_path / "fitted.pt", {"task": "segmentation", "object_radius": 3.0}))
    img, gt = five_nuclei()
    prep = _prepared(net, img, _strokes(gt), FinetuneConfig(**TINY))
    assert prep.radii == [3.0] and prep.work[0].shape == (192, 192)  # 6 / 3 = 2x


# ----------------------------------------------------------------------------- radius from the strokes


def _body_with_bones(shape=(160, 160)):
    """A large dim 'body' (radius 60) holding small bright 'bones' (radius 4), CT-like."""
    img = np.full(shape, 10.0)
    img[disk((80, 80), 60, shape=shape)] = 80
    gt = np.zeros(shape, np.int32)
    centres = [(60, 60), (60, 100), (100, 60), (100, 100), (80, 80), (50, 80), (110, 80)]
    for k, c in enumerate(centres, start=1):
        gt[disk(c, 4, shape=shape)] = k
    img[gt > 0] = 200
    img += np.random.default_rng(0).normal(0, 3, shape)
    s = np.zeros(shape, np.uint8)
    for c in centres[:3]:
        s[c[0], c[1] - 3 : c[1] + 4] = 2  # 7 px strokes across bones
    s[70, 65:95] = 1  # background strokes in the body, between the bones
    s[90, 65:95] = 1
    return img.astype(np.float32), s


def test_the_radius_comes_from_the_strokes_where_the_estimate_found_the_body(tiny_model, monkeypatch):
    import napari_mae.segmentation as segmentation
    from napari_mae.models.decoder import load_segmenter

    net = load_segmenter(tiny_model)
    monkeypatch.setattr(segmentation, "estimate_object_radius", lambda img, sp, **k: {"radius": 60.0})
    img, s = _body_with_bones()
    prep = _prepared(net, img, s, FinetuneConfig(**TINY))
    assert prep.radii == [3.5] and prep.sources == ["strokes"]  # half the 7 px strokes
    assert prep.work[0].shape == (274, 274)  # 6 / 3.5 of 160 px


def test_short_strokes_in_the_objects_found_keep_the_estimate(tiny_model):
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation import estimate_object_radius
    from napari_mae.segmentation.learned import prepare_image

    net = load_segmenter(tiny_model)
    img, gt = five_nuclei()
    s = np.zeros(gt.shape, np.uint8)
    s[20, 19:22] = 2  # 3 px clicks in objects the estimate finds
    s[46, 47:50] = 2
    s[5, 5:40] = 1
    prep = _prepared(net, img, s, FinetuneConfig(**TINY))
    expected = estimate_object_radius(prepare_image(img)[0], np.ones(2))["radius"]
    assert prep.sources == ["estimate"] and prep.radii == [pytest.approx(expected)]


def test_cli_finetune_radius_is_stored_and_bad_radius_is_one_line(tiny_model, tmp_path, capsys):
    import tifffile

    from napari_mae.cli import main
    from napari_mae.models.decoder import load_segmenter

    img, gt = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", _strokes(gt))
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif"), "--out", str(out)]
    args += ["--model", str(tiny_model), "--steps", "2", "--seconds", "120", "--device", "cpu"]
    assert main([*args, "--radius", "0"]) == 2 and not out.exists()
    assert "--radius must be positive" in capsys.readouterr().err
    assert main([*args, "--radius", "4.5"]) == 0
    assert load_segmenter(out).fitted_radius == 4.5


def test_given_radius_of_a_volume_is_not_re_estimated(tiny_model, monkeypatch):
    """A volume with a given ``object_radius``: the learned method segments at it. The
    decoder's plane estimate replaced it (a sweep of given radii on a nuclei volume ran at
    the planes' radius instead, whatever was given)."""
    from napari_mae.segmentation import learned, segment_instances

    # the tiny random decoder finds no objects in planes: stand in for one that does
    monkeypatch.setattr(learned, "_radius_from_planes", lambda *a, **k: 9.0)

    rng = np.random.default_rng(0)
    vol = rng.random((12, 48, 48)).astype(np.float32)
    vol[4:8, 10:20, 10:20] += 2.0
    _, info = segment_instances(vol, method="learned", model=str(tiny_model), object_radius=4.0)
    assert info["radius_source"] == "given"
    assert info["radius"] == 4.0
    assert info["radius_planes"] is None
    _, est = segment_instances(vol, method="learned", model=str(tiny_model))
    assert est["radius_source"] == "estimate" and est["radius_planes"] == 9.0


def test_a_volume_is_fine_tuned_at_the_classical_estimate(tiny_model, monkeypatch):
    """Not at the untuned decoder's re-estimate from planes: where it is wrong, that estimate
    is wrong with it (a blurred nuclei volume: 1.4x the labels' radius)."""
    import napari_mae.segmentation.learned as learned
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation import estimate_object_radius
    from napari_mae.segmentation.prepare import prepare_image

    monkeypatch.setattr(learned, "_radius_from_planes", lambda *a, **k: 9.0)
    net = load_segmenter(tiny_model)
    img, gt = five_nuclei()
    vol = np.stack([img] * 12).astype(np.float32)
    strokes = np.zeros(vol.shape, np.uint8)
    strokes[6] = _strokes(gt)
    prep = _prepared(net, vol, strokes, FinetuneConfig(**TINY), spacing=(1.0, 1.0, 1.0))
    x, _ = prepare_image(vol)
    assert prep.sources == ["estimate"]
    assert prep.radii[0] == pytest.approx(estimate_object_radius(x, (1.0, 1.0, 1.0))["radius"])
    assert prep.radii[0] != 9.0
