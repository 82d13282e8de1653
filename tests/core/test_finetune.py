"""Fine-tuning a segmentation model from scribbles, corrected objects and pseudo-labels."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk
from synthetic import five_nuclei

from napari_mae.segmentation.finetune import (
    FinetuneConfig,
    check_finetune_inputs,
    finetune,
    partial_segmentation_loss,
    training_planes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A tiny budget: a few steps of small crops, no live labels unless asked.
TINY = dict(seconds=None, steps=4, eval_every=2, batch_size=2, crop_size=64, live_every_s=0, device="cpu")


def _strokes(gt):
    s = np.zeros(gt.shape, np.uint8)
    s[20, 16:25] = 2  # inside object 1
    s[46, 44:53] = 2  # inside object 5
    s[5, 5:40] = 1
    s[90, 40:90] = 1
    return s


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- loss


def test_partial_loss_is_the_segmentation_loss_with_full_weights():
    from napari_mae.training.segmentation import segmentation_loss

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 16, 16, generator=g)
    y[:, 1:] = torch.sigmoid(y[:, 1:])
    t = torch.rand(2, 3, 16, 16, generator=g)
    t[:, 0] = (t[:, 0] > 0.5).float()
    w = torch.ones(2, 2, 16, 16)
    assert torch.allclose(partial_segmentation_loss(y, t, w, bce_weight=0.0), segmentation_loss(y, t))


def test_partial_loss_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, 3, 8, 8, generator=g)
    t = torch.zeros(1, 3, 8, 8)
    t[:, 0, :4] = 1.0
    w = torch.zeros(1, 2, 8, 8)
    w[:, :, :, :4] = 1.0  # the left half is labelled
    base = partial_segmentation_loss(y, t, w)
    y2 = y.clone()
    y2[:, :, :, 4:] += 5.0  # change the prediction where nothing is labelled
    assert torch.allclose(partial_segmentation_loss(y2, t, w), base)
    y3 = y.clone()
    y3[:, 0, :, :4] -= 5.0
    assert not torch.allclose(partial_segmentation_loss(y3, t, w), base)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s, c: (np.where(s == 2, 0, s), None), "no object stroke"),
        (lambda s, c: (np.where(s == 1, 0, s), None), "no background stroke"),
        (lambda s, c: (s[:-1], None), "scribbles 0 have shape"),
        (lambda s, c: (s, c[:, :-2]), "corrected objects 0 have shape"),
        (lambda s, c: (s, np.where(c > 0, 2**31, 0).astype(np.int64)), "above 2\\*\\*31"),
        # integer-valued floats pass, as in segment_instances (one check: scribbles.check_scribbles)
        (lambda s, c: (s.astype(np.float32) + 0.5, None), "integer labels"),
        (lambda s, c: ([s, s], None), "2 scribble arrays for 1 images"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(change, match):
    img, gt = five_nuclei()
    s, c = change(_strokes(gt), gt.astype(np.int64))
    with pytest.raises(ValueError, match=match):
        check_finetune_inputs(img, s, c)


def test_corrected_objects_alone_are_enough_labels():
    img, gt = five_nuclei()
    check_finetune_inputs(img, np.zeros_like(gt, np.uint8), np.where(gt == 1, 1, 0))


def test_bad_input_leaves_the_model_and_out_untouched(tiny_model, tmp_path):
    img, gt = five_nuclei()
    before = _digest(tiny_model)
    out = tmp_path / "new.pt"
    with pytest.raises(ValueError, match="no background stroke"):
        next(finetune(img, np.where(_strokes(gt) == 1, 0, _strokes(gt)), out=out, model=tiny_model))
    with pytest.raises(ValueError, match="is the model being fine-tuned"):
        next(finetune(img, _strokes(gt), out=tiny_model, model=tiny_model, overwrite=True))
    with pytest.raises(ValueError, match=r"\.pt"):
        next(finetune(img, _strokes(gt), out=tmp_path / "new.tif", model=tiny_model))
    assert _digest(tiny_model) == before and not out.exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"seconds": None, "steps": None}, "time budget"),
        ({"seconds": 0}, "seconds"),
        ({"crop_size": 40}, "crop_size"),
        ({"pseudo_confidence": 0.4}, "pseudo_confidence"),
        ({"encoder_blocks": -1}, "encoder_blocks"),
        ({"pseudo_source": "labels"}, "pseudo_source"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kw)


# ----------------------------------------------------------------------------- runs


def test_tiny_run_saves_a_loadable_model_and_keeps_the_previous_one(tiny_model, tmp_path):
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.models.decoder import load_segmenter

    img, gt = five_nuclei()
    before = _digest(tiny_model)
    out = tmp_path / "tuned.pt"
    cfg = FinetuneConfig(**{**TINY, "live_every_s": 1e-6})
    updates = list(finetune(img, _strokes(gt), out=out, model=tiny_model, corrected=None, config=cfg))
    kinds = [u.kind for u in updates]
    assert kinds[:2] == ["start", "prepared"] and kinds[-1] == "finished"
    assert kinds.count("step") == 4 and kinds.count("evaluated") == 2
    steps = [u for u in updates if u.kind == "step"]
    assert [u.step for u in steps] == [1, 2, 3, 4] and all(np.isfinite(u.loss) for u in steps)
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(updates, updates[1:], strict=False))
    live = [u.labels for u in updates if u.kind == "evaluated"]
    assert live[0] is not None and live[0].shape == gt.shape  # labels for live display
    final = updates[-1]
    assert final.checkpoint == out and out.is_file() and str(out) in final.message
    tuned, old = load_segmenter(out), load_segmenter(tiny_model)  # weights_only load
    assert tuned.decoder_config == old.decoder_config
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, old.state_dict()[k])]
    assert changed and not any(k.startswith("encoder.") for k in changed)  # the encoder stayed frozen
    ckpt = load_checkpoint(out)
    assert ckpt["extra"]["finetuned_from"] == str(tiny_model) and not ckpt.get("training_state")
    assert _digest(tiny_model) == before


def test_encoder_blocks_train_the_last_blocks_only(tiny_model, tmp_path):
    from napari_mae.models.decoder import load_segmenter

    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    cfg = FinetuneConfig(**{**TINY, "steps": 2, "encoder_blocks": 1, "pseudo_labels": False})
    list(finetune(img, _strokes(gt), out=out, model=tiny_model, config=cfg))
    tuned, old = load_segmenter(out).state_dict(), load_segmenter(tiny_model).state_dict()
    changed = {k for k in tuned if not torch.equal(tuned[k], old[k]) and k.startswith("encoder.")}
    # the last of the 4 transformer blocks and the final LayerNorm (blocks.4) after it
    assert any(k.startswith("encoder.blocks.3.") for k in changed)
    assert all(k.startswith(("encoder.blocks.3.", "encoder.blocks.4.")) for k in changed), sorted(changed)


def test_stop_in_the_first_step_saves_nothing(tiny_model, tmp_path):
    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2  # two checks while preparing pass, then Stop before step 2

    updates = list(
        finetune(img, _strokes(gt), out=out, model=tiny_model, config=FinetuneConfig(**TINY), stop=stop)
    )
    assert updates[-1].kind == "stopped" and updates[-1].checkpoint is None
    assert "nothing was saved" in updates[-1].message and not out.exists()


def test_stop_while_preparing_saves_nothing(tiny_model, tmp_path):
    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    updates = list(
        finetune(
            img, _strokes(gt), out=out, model=tiny_model, config=FinetuneConfig(**TINY), stop=lambda: True
        )
    )
    assert [u.kind for u in updates] == ["stopped"] and "nothing was saved" in updates[0].message
    assert not out.exists()


def test_stop_after_an_evaluation_keeps_the_best_model(tiny_model, tmp_path):
    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    seen = []

    def stop():
        return bool(seen) and seen[-1].kind == "evaluated"

    for u in finetune(img, _strokes(gt), out=out, model=tiny_model, config=FinetuneConfig(**TINY), stop=stop):
        seen.append(u)
    assert seen[-1].kind == "stopped" and seen[-1].checkpoint == out and out.is_file()
    assert seen[-1].best_step == 2 and "best model" in seen[-1].message


# ----------------------------------------------------------------------------- targets


def _prepared(net, images, scribbles, corrected, cfg, spacing=None, object_radius=None):
    from napari_mae.segmentation.finetune import _prepare, _spacings

    imgs, s, c = check_finetune_inputs(images, scribbles, corrected)
    return _prepare(net, imgs, s, c, _spacings(spacing, imgs, None), None, object_radius, cfg, lambda: None)


def test_targets_strokes_corrected_objects_and_pseudo_labels(tiny_model):
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation.targets import distance_targets

    net = load_segmenter(tiny_model)
    img, gt = five_nuclei()
    corrected = np.where(gt == 3, 7, 0)
    strokes = _strokes(gt)
    cfg = FinetuneConfig(**{**TINY, "pseudo_confidence": 0.51, "pseudo_distance": 1.0})
    prep = _prepared(net, img, strokes, corrected, cfg, object_radius=6.0)
    assert prep.work[0].shape == gt.shape  # objects of radius 6 px: the model's scale already
    (item,) = training_planes(net, prep, cfg)
    t, w = item["target"], item["weight"]
    # strokes: the foreground target, no distance loss
    assert (t[0][strokes == 2] == 1).all() and (w[0][strokes > 0] == 1).all()
    assert (w[1][strokes == 1] == 0).all() and (w[1][strokes == 2] == 0).all()
    # a corrected object: all three targets inside, background on a ring around it
    inside = corrected > 0
    np.testing.assert_allclose(t[:, inside], distance_targets(corrected)[:, inside])
    assert (w[:, inside] == 1).all()
    ring = np.zeros_like(inside)
    ring[disk((70, 28), 7.5, shape=ring.shape)] = True
    ring &= ~inside
    assert (t[0][ring] == 0).all() and (w[0][ring] == 1).all()
    # pseudo-labels only away from the user's labels, at their weight
    pseudo = (w[0] > 0) & (w[0] < 1)
    from scipy import ndimage as ndi

    near = ndi.distance_transform_edt(item["user"][0] == 0) <= cfg.pseudo_distance * 6.0
    assert not (pseudo & near).any()
    assert np.allclose(w[0][pseudo], cfg.pseudo_weight)


def test_pseudo_labels_off_where_the_strokes_show_the_model_wrong(tiny_model):
    from napari_mae.models.decoder import load_segmenter

    net = load_segmenter(tiny_model)
    with torch.no_grad():  # a model that calls everything foreground
        net.out.conv.conv.bias[0] = 50.0
    img, gt = five_nuclei()
    cfg = FinetuneConfig(**{**TINY, "pseudo_confidence": 0.6, "pseudo_distance": 0.5})
    (item,) = training_planes(net, _prepared(net, img, _strokes(gt), None, cfg), cfg)
    assert item["pseudo"] == {"foreground": False, "background": True}
    assert not ((item["weight"][0] > 0) & (item["weight"][0] < 1)).any()  # and none is confident bg


def test_volume_strokes_on_any_plane(tiny_model):
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation.learned import isotropic_factor, predict_volume_maps

    net = load_segmenter(tiny_model)
    vol = np.zeros((20, 40, 40), np.float32)
    gt = np.zeros(vol.shape, np.int32)
    zz, yy, xx = np.ogrid[:20, :40, :40]
    for k, (z, y, x) in enumerate([(10, 12, 12), (10, 28, 28)], start=1):
        gt[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 36] = k
    vol[gt > 0] = 1.0
    vol += np.random.default_rng(0).normal(0, 0.05, vol.shape).astype(np.float32)
    s = np.zeros(gt.shape, np.uint8)
    s[8:13, 12, 12] = 2  # a stroke along Z: painted on a Y (or X) plane
    s[2, 2:10, 30] = 1
    cfg = FinetuneConfig(**{**TINY, "pseudo_labels": False})
    prep = _prepared(net, vol, s, None, cfg, spacing=(1.0, 1.0, 1.0))
    axes = {pl.source[1] for pl in prep.planes}
    assert {1, 2} <= axes  # the Z stroke lies on Y and X planes
    # the training grid is the inference grid
    _, factor = predict_volume_maps(net, prep.images[0], (1.0, 1.0, 1.0), prep.radii[0], 6.0)
    np.testing.assert_allclose(prep.factors[0], factor)
    # 4 x 2 x 2 = 16x the voxels: brought down to 8x
    np.testing.assert_allclose(
        isotropic_factor((2.0, 1.0, 1.0), 3.0, 6.0), np.array([4.0, 2.0, 2.0]) / 2 ** (1 / 3)
    )
    items = training_planes(net, prep, cfg)
    assert sum(float(it["user"].sum()) for it in items) > 0


# ----------------------------------------------------------------------------- CLI


def _cli_finetune_args(tmp_path, tiny_model):
    """``finetune`` arguments for a tiny run on the test nuclei, the output path, the labels."""
    img, gt = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", _strokes(gt))
    out = tmp_path / "tuned.pt"
    args = ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif"), "--out", str(out)]
    args += ["--model", str(tiny_model), "--steps", "2", "--seconds", "120", "--device", "cpu"]
    return args, out, gt


def test_cli_finetune_then_segment_with_it(tiny_model, tmp_path, capsys):
    from napari_mae.cli import main

    args, out, gt = _cli_finetune_args(tmp_path, tiny_model)
    assert main(args) == 0
    assert "saved the best model" in capsys.readouterr().out and out.is_file()
    seg = ["segment", str(tmp_path / "img.tif"), "--method", "learned", "--model", str(out)]
    assert main([*seg, "--out", str(tmp_path / "labels.tif"), "--quiet"]) == 0
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == gt.shape


def test_cli_finetune_bad_input_is_one_line(tiny_model, tmp_path, capsys):
    from napari_mae.cli import main

    img, gt = five_nuclei()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", np.where(_strokes(gt) == 2, 0, _strokes(gt)).astype(np.uint8))
    out = tmp_path / "tuned.pt"
    code = main(
        ["finetune", str(tmp_path / "img.tif"), "--scribbles", str(tmp_path / "s.tif"), "--out", str(out),
         "--model", str(tiny_model)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no object stroke" in err[0] and not out.exists()


def test_a_budget_used_up_while_preparing_says_so(tiny_model, tmp_path):
    img, gt = five_nuclei()
    out = tmp_path / "tuned.pt"
    cfg = FinetuneConfig(**{**TINY, "seconds": 1e-3, "steps": None})
    updates = list(finetune(img, _strokes(gt), out=out, model=tiny_model, config=cfg))
    assert updates[-1].kind == "finished" and updates[-1].checkpoint is None
    assert "more seconds" in updates[-1].message and "nothing was saved" in updates[-1].message
    assert not out.exists()


def test_pseudo_labels_from_the_classical_pipeline(tiny_model):
    """pseudo_source="classical": the classical scribble mode's objects are the
    pseudo-labels, whole (all three targets) and everywhere the user did not label, except on
    their outlines; the untrained model's own predictions are not used."""
    from skimage.segmentation import find_boundaries

    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation import segment_instances
    from napari_mae.segmentation.targets import distance_targets

    net = load_segmenter(tiny_model)
    img, gt = five_nuclei()
    strokes = _strokes(gt)
    cfg = FinetuneConfig(**{**TINY, "pseudo_source": "classical"})
    prep = _prepared(net, img, strokes, None, cfg, object_radius=6.0)
    (item,) = training_planes(net, prep, cfg)
    t, w = item["target"], item["weight"]
    teacher, _ = segment_instances(img, method="classical", scribbles=strokes)
    assert teacher.max() == 5  # the five nuclei, the pseudo-labels' source
    pseudo = (w[0] > 0) & (w[0] < 1)
    edge = find_boundaries(teacher, mode="thick")
    assert pseudo.sum() > 0.8 * (~edge & (strokes == 0)).sum()
    assert not (pseudo & edge).any() and not (pseudo & (strokes > 0)).any()
    inner = pseudo & (teacher > 0)
    np.testing.assert_allclose(t[:, inner], distance_targets(teacher)[:, inner])
    assert (t[0][pseudo & (teacher == 0)] == 0).all()
    assert item["pseudo"] == {"foreground": True, "background": True}


def test_cli_pseudo_source(tiny_model, tmp_path, capsys):
    from napari_mae.cli import main
    from napari_mae.io.checkpoint import load_checkpoint

    args, out, gt = _cli_finetune_args(tmp_path, tiny_model)
    assert main([*args, "--pseudo-source", "classical"]) == 0
    assert load_checkpoint(out)["extra"]["finetune"]["pseudo_source"] == "classical"
    assert "pseudo-labels (classical):" in capsys.readouterr().err  # the log says which source ran
    with pytest.raises(SystemExit):  # argparse: not a choice
        main([*args, "--pseudo-source", "labels", "--overwrite"])
    assert "invalid choice" in capsys.readouterr().err


def test_agreement_pseudo_labels_need_the_model_too(tiny_model):
    """pseudo_source="agreement": the classical objects only where the model confidently
    says foreground too, its background where the model says background."""
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation import segment_instances

    net = load_segmenter(tiny_model)
    with torch.no_grad():  # a model that calls everything background
        net.out.conv.conv.bias[0] = -50.0
    img, gt = five_nuclei()
    strokes = _strokes(gt)
    cfg = FinetuneConfig(**{**TINY, "pseudo_source": "agreement"})
    (item,) = training_planes(net, _prepared(net, img, strokes, None, cfg, object_radius=6.0), cfg)
    w, t = item["weight"][0], item["target"][0]
    pseudo = (w > 0) & (w < 1)
    teacher, _ = segment_instances(img, method="classical", scribbles=strokes)
    assert pseudo.any() and not (pseudo & (teacher > 0)).any()  # no object: the model disagrees
    assert (t[pseudo] == 0).all()  # background, where both say so
    cfg = FinetuneConfig(**{**TINY, "pseudo_source": "classical"})
    (item,) = training_planes(net, _prepared(net, img, strokes, None, cfg, object_radius=6.0), cfg)
    w = item["weight"][0]
    assert ((w > 0) & (w < 1) & (teacher > 0)).any()  # the classical source alone keeps them
