"""Tests of napari_mae.training.data: folder listing, transforms, datasets, skipped files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_mae.training.data import (
    SeededCrops,
    find_images,
    make_datasets,
    make_transforms,
    sample_seed,
)


def _real_2d() -> list[np.ndarray]:
    """Small real microscopy images bundled with scikit-image (no download)."""
    from skimage import data

    cell = data.cell()  # (660, 550) uint8, phase-contrast cell
    coins = data.coins()  # (303, 384) uint8
    return [cell[:96, :120], cell[200:280, 100:200], coins[:70, :90], coins[100:200, 200:300]]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Folder of 4 small real 2D TIFFs, one PNG and one 3D TIFF in a subfolder."""
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    imgs = _real_2d()
    for i, img in enumerate(imgs):
        tifffile.imwrite(folder / f"img{i}.tif", img)
    Image.fromarray(imgs[0]).save(folder / "sub" / "photo.PNG")
    vol = np.stack([imgs[1][:64, :64]] * 12)  # (12, 64, 64)
    tifffile.imwrite(folder / "sub" / "stack.tif", vol)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._img0.tif").write_bytes(b"resource fork")
    return folder


def test_find_images_recursive_case_insensitive(image_folder):
    files = find_images(image_folder)
    names = [f.name for f in files]
    assert names == sorted(names, key=lambda n: str(files[names.index(n)]))
    assert set(names) == {"img0.tif", "img1.tif", "img2.tif", "img3.tif", "photo.PNG", "stack.tif"}
    assert [f.name for f in find_images(image_folder, exclude=("sub/*",))] == [
        f"img{i}.tif" for i in range(4)
    ]
    assert len(find_images([image_folder / "img0.tif", image_folder / "sub"])) == 3


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        (lambda p: p / "missing", FileNotFoundError),
        (lambda p: p, ValueError),  # empty folder
    ],
)
def test_find_images_errors(tmp_path, setup, error):
    with pytest.raises(error, match="image"):
        find_images(setup(tmp_path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 4, "img_size": (8, 8)},
        {"spatial_dims": 2, "img_size": (8, 8, 8)},
        {"spatial_dims": 2, "img_size": (0, 8)},
        {"spatial_dims": 2, "img_size": (8, 8), "in_channels": 0},
        {"spatial_dims": 2, "img_size": (8, 8), "percentiles": (50, 10)},
        {"spatial_dims": 2, "img_size": (8, 8), "spacing": (1.0, -1.0)},
    ],
)
def test_make_transforms_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_transforms(**kwargs)


@pytest.mark.parametrize(
    ("spatial_dims", "img_size", "in_channels", "n_train_val"),
    [
        (2, (32, 32), 1, 6),  # 2D model: all six files (planes from the 3D stack)
        (2, (16, 40), 3, 6),  # non-square crop, 3 channels (grey repeated)
        (3, (8, 32, 32), 1, 1),  # 3D model: only the stack, 2D files skipped
    ],
)
def test_make_datasets_shapes(image_folder, spatial_dims, img_size, in_channels, n_train_val):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = make_datasets(
            image_folder,
            spatial_dims=spatial_dims,
            img_size=img_size,
            in_channels=in_channels,
            val_fraction=0.2,
            samples_per_image=2,
        )
    assert len(d.train_files) + len(d.val_files) == n_train_val
    assert len(d.train) == 2 * len(d.train_files)
    for ds in (d.train, d.val):
        for i in range(len(ds)):
            x = ds[i]
            assert type(x) is torch.Tensor
            assert x.shape == (in_channels, *img_size) and x.dtype == torch.float32
            assert torch.isfinite(x).all()
    if spatial_dims == 3:
        assert len(d.skipped) == 5 and all("2D image" in why for why in d.skipped.values())
        assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    else:
        assert not d.skipped


def test_intensity_scaling_matches_percentiles(image_folder):
    d = make_datasets(
        image_folder / "img0.tif", spatial_dims=2, img_size=(96, 120), val_fraction=0, augment=False
    )
    x = d.train[0].numpy()
    ref = tifffile.imread(image_folder / "img0.tif").astype(np.float64)
    lo, hi = np.percentile(ref, [1.0, 99.8])
    np.testing.assert_allclose(x[0], (ref - lo) / (hi - lo), atol=1e-5)


def test_crops_depend_only_on_seed_epoch_index(image_folder):
    kw = {"spatial_dims": 2, "img_size": (24, 24), "val_fraction": 0.2, "seed": 3}
    a = make_datasets(image_folder, **kw)
    b = make_datasets(image_folder, **kw)
    assert a.val_files == b.val_files and a.train_files == b.train_files
    a.train.set_epoch(2)
    b.train.set_epoch(2)
    order = [3, 0, 4, 1]
    xs = [a.train[i] for i in order]  # a different access order, same crops
    for i, x in zip(order, xs, strict=True):
        assert torch.equal(x, b.train[i])
    b.train.set_epoch(3)
    assert not all(torch.equal(a.train[i], b.train[i]) for i in range(len(a.train)))
    # validation crops are fixed, whatever the epoch
    v0 = a.val[0]
    a.val.set_epoch(7)
    assert torch.equal(a.val[0], v0)


def test_unreadable_files_skipped_with_one_warning(image_folder):
    (image_folder / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    (image_folder / "empty.nii.gz").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 of 8") as record:
        d = make_datasets(image_folder, spatial_dims=2, img_size=(16, 16))
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    message = next(str(w.message) for w in record if "skipped" in str(w.message))
    assert "broken.tif" in message and "empty.nii.gz" in message
    assert {p.name for p in d.skipped} == {"broken.tif", "empty.nii.gz"}
    assert len(d.train_files) + len(d.val_files) == 6


def test_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 1 image files"):
        make_datasets(tmp_path, spatial_dims=2, img_size=(16, 16))


def test_disk_cache_reused(image_folder, tmp_path):
    kw = {"spatial_dims": 2, "img_size": (16, 16), "cache": "disk", "cache_dir": tmp_path / "cache"}
    a = make_datasets(image_folder, **kw)
    n_cached = len(list((tmp_path / "cache").rglob("*.pt")))
    assert n_cached == 6
    b = make_datasets(image_folder, **kw)
    assert torch.equal(a.train[0], b.train[0])
    with pytest.raises(ValueError, match="cache_dir"):
        make_datasets(image_folder, spatial_dims=2, img_size=(16, 16), cache="disk")


def test_seeded_crops_validation():
    with pytest.raises(ValueError, match="repeats"):
        SeededCrops([], [], None, repeats=0)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_nifti_axes_reversed_to_zyx(tmp_path):
    """MONAI's NibabelReader gives (X, Y, Z); the datasets give (Z, Y, X) like io.readers."""
    import nibabel as nib

    from napari_mae.io.readers import read_image

    zyx = np.stack([_real_2d()[0][:30, :40]] * 6).astype(np.float32)  # (Z=6, Y=30, X=40)
    zyx *= np.arange(1, 7, dtype=np.float32)[:, None, None]  # make the Z axis recognisable
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(zyx.transpose(2, 1, 0), np.diag([0.5, 0.5, 2.0, 1.0])), path)
    d = make_datasets(path, spatial_dims=3, img_size=(6, 30, 40), val_fraction=0, augment=False)
    item = d.train.base[d.train.indices[0]]
    assert tuple(item["image"].shape) == (1, 6, 30, 40)
    assert item["spacing"] == pytest.approx((2.0, 0.5, 0.5))
    ref, _, _ = read_image(path)
    assert ref.shape == (6, 30, 40)
    lo, hi = np.percentile(zyx, [1.0, 99.8])
    np.testing.assert_allclose(item["image"][0].numpy(), (zyx - lo) / (hi - lo), atol=1e-5)


def test_dataloader_workers_under_spawn(image_folder):
    # The transforms were classes defined inside a function, which cannot be pickled:
    # DataLoader(num_workers > 0) failed under "spawn" (the default on macOS and Windows).
    import pickle

    data = make_datasets(image_folder, spatial_dims=2, img_size=(16, 16), val_fraction=0.0, cache="none")
    pickle.dumps(data.train)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=2, num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == len(data.train)
    single = torch.cat(list(torch.utils.data.DataLoader(data.train, batch_size=2)))
    assert torch.equal(torch.cat(batches), single)  # crops depend on (seed, epoch, index) only
