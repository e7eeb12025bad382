"""Photographs as an image-to-image source: offline loading, folders, image-level splits, crops, tiles."""

import pathlib
import socket

import ml_collections
import numpy as np
import pytest
import skimage.data
import sklearn.datasets
from PIL import Image

from kdjax.core import photos


@pytest.fixture(scope="module")
def astronaut():
    return photos.load_skimage_photo("astronaut", channels=3)


def test_every_listed_photograph_loads_offline_and_is_distinct(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    images = photos.load_skimage_photos(channels=3)
    assert len(images) == len(photos.SKIMAGE_PHOTOS)
    for name, image in zip(photos.SKIMAGE_PHOTOS, images):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
        assert min(image.shape[:2]) >= 100 and image.std() > 5, name  # a picture, not a flat field
    fingerprints = {(im.shape, im[::7, ::7].tobytes()) for im in images}
    assert len(fingerprints) == len(images)  # no photograph twice (skimage's cat is chelsea)
    assert "cat" not in photos.SKIMAGE_PHOTOS and "chelsea" in photos.SKIMAGE_PHOTOS


def test_channels_grey_and_rgb(astronaut):
    raw = skimage.data.astronaut().astype(np.float64)
    grey = photos.load_skimage_photo("astronaut", channels=1)
    assert grey.shape == (512, 512, 1) and grey.dtype == np.uint8
    luma = (raw[..., 0] * 299 + raw[..., 1] * 587 + raw[..., 2] * 114) / 1000  # PIL's "L" (ITU-R 601-2)
    assert np.abs(grey[..., 0] - luma).max() <= 1.0
    np.testing.assert_array_equal(astronaut, skimage.data.astronaut())
    camera = photos.load_skimage_photo("camera", channels=3)  # a grey photograph, replicated
    for c in range(3):
        np.testing.assert_array_equal(camera[..., c], skimage.data.camera())
    with pytest.raises(ValueError, match="not a scikit-image photograph; valid: .*'astronaut'"):
        photos.load_skimage_photo("horse")
    with pytest.raises(ValueError, match="channels=2"):
        photos.load_skimage_photo("camera", channels=2)


def test_lfw_faces_leave_out_the_non_faces():
    faces = photos.load_lfw_faces(channels=1)
    raw = skimage.data.lfw_subset()  # 100 faces, then 100 background patches
    assert len(faces) == 100 and faces[0].shape == (25, 25, 1) and faces[0].dtype == np.uint8
    for i in (0, 57, 99):
        assert np.abs(faces[i][..., 0] - raw[i] * 255).max() <= 0.5
    assert photos.load_lfw_faces(channels=3)[3].shape == (25, 25, 3)


def test_sklearn_photos_are_the_packaged_jpegs_read_by_pil():
    folder = pathlib.Path(sklearn.datasets.__file__).parent / "images"
    rgb, grey = photos.load_sklearn_photos(channels=3), photos.load_sklearn_photos(channels=1)
    assert len(rgb) == 2 and all(im.shape == (427, 640, 3) and im.dtype == np.uint8 for im in rgb)
    for image, grey_image, name in zip(rgb, grey, ("china.jpg", "flower.jpg")):
        with Image.open(folder / name) as pil:
            np.testing.assert_array_equal(image, np.asarray(pil.convert("RGB")))
            np.testing.assert_array_equal(grey_image[..., 0], np.asarray(pil.convert("L")))
    assert photos.load_photos("sklearn", 3)[1].shape == (427, 640, 3)


def test_folder_photos(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = np.random.default_rng(1).integers(0, 256, (16, 12), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "b.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    images = photos.load_folder_photos(tmp_path, channels=3)
    assert len(images) == 2
    np.testing.assert_array_equal(images[0], rgb)
    np.testing.assert_array_equal(images[1], np.repeat(grey[..., None], 3, axis=-1))
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"1 of 3 image files are unreadable: .*c\.jpg"):
        photos.load_folder_photos(tmp_path)
    with pytest.raises(ValueError, match="not an existing directory"):
        photos.load_folder_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        photos.load_folder_photos(tmp_path / "empty")


def test_split_by_image_is_fixed_disjoint_and_never_empty():
    train, test = photos.split_by_image(17, 0.2)
    assert set(train).isdisjoint(test) and sorted([*train, *test]) == list(range(17))
    assert len(test) == 3  # round(17 * 0.2)
    again = photos.split_by_image(17, 0.2)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    other = photos.split_by_image(17, 0.2, seed=1)
    assert not np.array_equal(test, other[1])
    for n, fraction in [(2, 0.01), (2, 0.99), (5, 0.05), (5, 0.95)]:
        train, test = photos.split_by_image(n, fraction)
        assert len(train) >= 1 and len(test) >= 1 and len(train) + len(test) == n
    with pytest.raises(ValueError, match="Cannot split 1 image"):
        photos.split_by_image(1, 0.5)
    with pytest.raises(ValueError, match="test_fraction=1.0 must be in"):
        photos.split_by_image(10, 1.0)


def test_validation_is_carved_from_the_training_side_and_leaves_the_test_split_alone():
    images = [np.full((4, 4, 1), k, np.uint8) for k in range(17)]
    train0, test0 = photos.split_by_image(17, 0.2)
    train, validation, test = photos.split_photos(images, 0.2, 0.15)
    names = lambda ims: [int(im[0, 0, 0]) for im in ims]
    assert names(test) == list(test0)  # the same test photographs as without validation
    assert len(validation) == 2  # round(14 * 0.15)
    assert sorted(names(train) + names(validation)) == list(train0)
    assert set(names(train)).isdisjoint(names(validation))
    assert photos.split_photos(images, 0.2, 0.15)[1] is not validation and names(
        photos.split_photos(images, 0.2, 0.15)[1]) == names(validation)  # fixed across calls
    none = photos.split_photos(images, 0.2, 0.0)
    assert names(none[0]) == list(train0) and none[1] == []
    for n, fraction in [(2, 0.01), (2, 0.99), (6, 0.5)]:
        kept, val = photos.carve_validation(np.arange(n), fraction)
        assert len(kept) >= 1 and len(val) >= 1 and len(kept) + len(val) == n
    with pytest.raises(ValueError, match="validation_fraction=1.0 must be in"):
        photos.carve_validation(np.arange(5), 1.0)
    with pytest.raises(ValueError, match="from 1 training image"):
        photos.carve_validation(np.arange(1), 0.5)


def _data(**fields):
    cfg = ml_collections.ConfigDict(dict(source="skimage", folder="", channels=1, crop=48, test_fraction=0.2,
                                         validation_fraction=0.15, extra_validation="", eval_max_side=0,
                                         num_threads=1))
    cfg.update(fields)
    return cfg


def test_extra_validation_adds_a_whole_source_and_moves_nothing_else():
    train0, val0, test0 = photos.load_splits(_data())
    train, val, test = photos.load_splits(_data(extra_validation="sklearn"))
    fingerprint = lambda ims: [im[::9, ::9].tobytes() for im in ims]
    assert fingerprint(train) == fingerprint(train0) and fingerprint(test) == fingerprint(test0)
    assert len(val0) == 2 and fingerprint(val) == fingerprint(val0) + fingerprint(
        photos.load_sklearn_photos(channels=1))
    assert photos.validation_origin(_data(extra_validation="sklearn"), 4) == (
        "2 set aside from the training side and the 2 of source 'sklearn'")
    assert photos.validation_origin(_data(), 2) == "2 set aside from the training side"
    only = photos.load_splits(_data(validation_fraction=0.0, extra_validation="lfw"))
    assert len(only[1]) == photos.LFW_FACES and len(only[0]) == len(train0) + 2
    photos.check_photos_config(_data(extra_validation="sklearn"))
    for bad in ("skimage", "folder", "imagenet"):
        with pytest.raises(ValueError, match=f"extra_validation='{bad}' must be '' .*other than config.data.source="
                                             r"'skimage': \['lfw', 'sklearn'\]"):
            photos.check_photos_config(_data(extra_validation=bad))


def _tiny_images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (12, 15, 3), dtype=np.uint8), rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)]


def _locate(crop, images):
    """(image index, top, left) of every place the crop occurs, found by brute force."""
    k = crop.shape[0]
    return [(i, top, left) for i, im in enumerate(images) for top in range(im.shape[0] - k + 1)
            for left in range(im.shape[1] - k + 1) if np.array_equal(im[top:top + k, left:left + k], crop)]


def test_random_crops_are_a_function_of_seed_and_step():
    images = _tiny_images()
    a = photos.random_crops(images, 5, step=3, seed=7, batch=6)
    assert a.shape == (6, 5, 5, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, photos.random_crops(images, 5, step=3, seed=7, batch=6))
    assert not np.array_equal(a, photos.random_crops(images, 5, step=4, seed=7, batch=6))
    assert not np.array_equal(a, photos.random_crops(images, 5, step=3, seed=8, batch=6))
    for crop in a:
        assert len(_locate(crop, images)) == 1  # a true window of one image
    # Images are picked uniformly and positions cover the whole image, corners included.
    found = [_locate(c, images)[0] for s in range(60) for c in photos.random_crops(images, 5, s, 0, 4)]
    share = np.mean([i == 0 for i, _, _ in found])
    assert 0.35 < share < 0.65
    tops = {t for i, t, _ in found if i == 0}
    lefts = {left for i, _, left in found if i == 0}
    assert min(tops) == 0 and max(tops) == 7 and min(lefts) == 0 and max(lefts) == 10  # 12 x 15 image, crop 5


def test_random_crops_reject_small_images():
    images = _tiny_images()
    with pytest.raises(ValueError, match="image 1 is 9 x 9 pixels, smaller than the 10 x 10 crop"):
        photos.random_crops(images, 10, step=0, seed=0, batch=2)


def test_tile_starts_by_hand():
    assert photos.tile_starts(10, 4) == [0, 4, 6]
    assert photos.tile_starts(10, 4, overlap=1) == [0, 3, 6]
    assert photos.tile_starts(8, 4) == [0, 4]
    assert photos.tile_starts(4, 4) == [0]
    with pytest.raises(ValueError, match="tile 5 is larger than the image side 4"):
        photos.tile_starts(4, 5)
    with pytest.raises(ValueError, match="overlap=4 must be in"):
        photos.tile_starts(10, 4, overlap=4)


@pytest.mark.parametrize("overlap", [0, 3])
def test_tiles_round_trip(astronaut, overlap):
    image = astronaut[100:137, 200:250]  # 37 x 50: no multiple of the tile
    parts = photos.tiles(image, 16, overlap)
    assert parts.shape[1:] == (16, 16, 3)
    np.testing.assert_array_equal(parts[0], image[:16, :16])
    np.testing.assert_array_equal(parts[-1], image[-16:, -16:])  # last tile aligned to the border
    np.testing.assert_array_equal(photos.untile(parts, 37, 50, overlap), image)
    as_float = image.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(photos.untile(photos.tiles(as_float, 16, overlap), 37, 50, overlap), as_float)
    with pytest.raises(ValueError, match="do not cover a 60 x 50 image"):
        photos.untile(parts, 60, 50, overlap)


def test_untile_averages_overlaps():
    parts = np.stack([np.full((4, 4, 1), 1.0), np.full((4, 4, 1), 3.0)])  # starts 0 and 2 along a 6-wide row
    out = photos.untile(parts, 4, 6, overlap=2)
    np.testing.assert_array_equal(out[0, :, 0], [1, 1, 2, 2, 3, 3])
