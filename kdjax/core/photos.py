"""Photographs as the source of an image-to-image task (super-resolution, inpainting, enhancement).

Whole photographs of any size, as uint8 (H, W, C) arrays: the real photographs scikit-image ships (offline),
the 100 LFW faces of `skimage.data.lfw_subset`, scikit-learn's two sample photographs, or every image file of a
folder. Training reads random crops (`random_crops`, a pure function of (seed, step)); the train/test split is
over whole images (`split_by_image`), so no test pixel is ever trained on, and a validation set of whole images
can be carved from the training side (`carve_validation`) to choose settings on, and another packaged source's
photographs can join it whole (`extra_validation`; `load_splits` makes all three sets from `config.data`);
evaluation covers whole images in fixed-size tiles (`tiles`, `untile`).

An image-to-image task trains on pairs: `PairSource` (for grain) makes item i, a pure function of (seed, i),
from one random crop of a training photograph (the target) and its degradation (`kdjax.core.degradations`,
the input); `PoolSource` draws items from a fixed pool of them instead (e.g. with a teacher's outputs computed
once); `PairBatches` serves either as global batches by step, this process's rows only, like
`kdjax.core.data.TrainBatches`. `eval_pairs` gives the held-out photographs whole (centre-cropped to a
multiple of the scale, and to at most `eval_max_side` pixels when set), degraded with a fixed rng.
`check_photos_config` validates `config.data` before any compute.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import skimage.data
from PIL import Image

from kdjax.core.data import IMAGE_SUFFIXES, check_image_files
from kdjax.core.degradations import degrade
from kdjax.core.images import to_model_range

# The `skimage.data` photographs that load without a network in scikit-image 0.26 (camera, microscope,
# telescope, scanner). Left out: `cat` (the same array as `chelsea`: a duplicate could fall on both sides of
# a split), `clock` (deliberately motion-blurred: a poor clean target), `cell` (a phase image reconstructed
# from a hologram, with banding artefacts), the synthetic or binary images (`binary_blobs`, `checkerboard`,
# `colorwheel`, `horse`, `logo`, `shepp_logan_phantom`), and those that need the `pooch` download
# (`brain`, `cells3d`, `eagle`, `human_mitosis`, `kidney`, `lily`, `nickel_solidification`,
# `palisades_of_vogt`, `protein_transport`, `skin`, `vortex`). `stereo_motorcycle` gives its left view.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina",
                  "rocket", "stereo_motorcycle", "text")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")  # sklearn.datasets.load_sample_images(), 427 x 640 RGB
LFW_FACES = 100  # skimage.data.lfw_subset(): 100 faces, then 100 non-face background patches (left out)
SPLIT_SEED = 20_251_201  # the photographs' train/test permutation, independent of any run seed
POOL_SALT = 7  # keeps a PoolSource's draws apart from the PairSource draws of the same seed


# ----------------------------------------------------------------------------------------- loading
def to_channels(image: np.ndarray | Image.Image, channels: int) -> np.ndarray:
    """Any image -> uint8 (H, W, channels) via PIL: `convert("L")` (ITU-R 601-2 luma) for 1 channel,
    `convert("RGB")` (grey replicated, alpha dropped) for 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB).")
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
    return array[..., None] if channels == 1 else array


def load_skimage_photo(name: str, channels: int = 3) -> np.ndarray:
    """One `SKIMAGE_PHOTOS` photograph as uint8 (H, W, channels)."""
    if name not in SKIMAGE_PHOTOS:
        raise ValueError(f"{name!r} is not a scikit-image photograph; valid: {list(SKIMAGE_PHOTOS)}.")
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return to_channels(image, channels)


def load_skimage_photos(names: Sequence[str] = SKIMAGE_PHOTOS, channels: int = 3) -> list[np.ndarray]:
    """The photographs `names` (default: all of `SKIMAGE_PHOTOS`), each uint8 (H, W, channels)."""
    return [load_skimage_photo(name, channels) for name in names]


def load_lfw_faces(channels: int = 1) -> list[np.ndarray]:
    """The 100 grey 25 x 25 LFW faces of `skimage.data.lfw_subset()` (its last 100 images, background
    patches, are left out), each uint8 (25, 25, channels): the [0, 1] floats times 255, rounded (they are
    means of three 8-bit channels, so rounding moves a pixel by at most 1/3 grey level)."""
    faces = skimage.data.lfw_subset()[:LFW_FACES]
    return [to_channels(np.round(face * 255.0).astype(np.uint8), channels) for face in faces]


def load_sklearn_photos(channels: int = 3) -> list[np.ndarray]:
    """scikit-learn's two sample photographs (`SKLEARN_PHOTOS`: a Chinese temple and a flower, 427 x 640 RGB, in
    the package), each uint8 (427, 640, channels)."""
    from sklearn.datasets import load_sample_images  # scikit-learn is heavy; imported by the source that needs it

    sample = load_sample_images()
    by_name = {pathlib.Path(path).name: image for path, image in zip(sample.filenames, sample.images)}
    return [to_channels(by_name[name], channels) for name in SKLEARN_PHOTOS]


def load_folder_photos(folder: str | pathlib.Path, channels: int = 3) -> list[np.ndarray]:
    """Every image file directly in `folder` (suffixes `IMAGE_SUFFIXES`, sorted by name), uint8 (H, W,
    channels); raises ValueError if the folder is missing or empty, or naming its unreadable files."""
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"photo folder {str(folder)!r} is not an existing directory.")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"photo folder {str(folder)!r} holds no image files (suffixes {list(IMAGE_SUFFIXES)}).")
    check_image_files(files, field=f"photo folder {str(folder)!r}")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(to_channels(image, channels))
    return images


# ----------------------------------------------------------------------------------------- splits and crops
def split_by_image(num_images: int, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A train/test split of whole images, fixed for all runs: (train indices, test indices), sorted.

    A permutation from `seed` (not the run seed); the first n_test = round(num_images * test_fraction),
    clamped to [1, num_images - 1], images of it are the test set, so both sides are non-empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    if num_images < 2:
        raise ValueError(f"Cannot split {num_images} image(s) into non-empty train and test sets; need >= 2.")
    n_test = min(max(1, round(num_images * test_fraction)), num_images - 1)
    perm = np.random.default_rng(seed).permutation(num_images)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def carve_validation(train: np.ndarray, fraction: float, seed: int = SPLIT_SEED + 1) -> tuple[np.ndarray, np.ndarray]:
    """Whole images of a training split set aside to choose settings on: (train indices, validation indices),
    sorted. A permutation of `train` from `seed` (fixed, independent of any run seed); its first
    round(len(train) * fraction) images, clamped to len(train) - 1 when fraction > 0 (and at least 1), are the
    validation set; fraction 0 gives none. The test split is not touched, so adding validation never changes it.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must be in [0, 1).")
    train = np.asarray(train)
    if fraction == 0.0:
        return np.sort(train), train[:0]
    if len(train) < 2:
        raise ValueError(f"Cannot carve a validation set from {len(train)} training image(s); need >= 2.")
    n_val = min(max(1, round(len(train) * fraction)), len(train) - 1)
    perm = np.random.default_rng(seed).permutation(train)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def check_crop_size(images: Sequence[np.ndarray], crop: int) -> None:
    """Raises ValueError naming the first image smaller than `crop` x `crop` (its index and size)."""
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        if h < crop or w < crop:
            raise ValueError(f"image {i} is {h} x {w} pixels, smaller than the {crop} x {crop} crop.")


def random_crops(images: Sequence[np.ndarray], crop: int, step: int, seed: int, batch: int) -> np.ndarray:
    """`batch` random crop x crop patches, (batch, crop, crop, C), a pure function of (seed, step).

    With rng = np.random.default_rng([seed, step]): for each patch an image index uniform in [0, N), then
    a top-left corner uniform over the positions where the crop fits in that image.
    """
    check_crop_size(images, crop)
    rng = np.random.default_rng([seed, step])
    patches = []
    for i in rng.integers(0, len(images), size=batch):
        image = images[int(i)]
        top = int(rng.integers(0, image.shape[0] - crop + 1))
        left = int(rng.integers(0, image.shape[1] - crop + 1))
        patches.append(image[top:top + crop, left:left + crop])
    return np.stack(patches)


# ----------------------------------------------------------------------------------------- tiles
def tile_starts(size: int, tile: int, overlap: int = 0) -> list[int]:
    """Start offsets along one side: 0, stride, 2 stride, ... (stride = tile - overlap) while a tile fits,
    and a last tile aligned to the border at size - tile, so every pixel is covered."""
    if tile > size:
        raise ValueError(f"tile {tile} is larger than the image side {size}.")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap} must be in [0, tile={tile}).")
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def tiles(image: np.ndarray, tile: int, overlap: int = 0) -> np.ndarray:
    """One (H, W, C) image -> (N, tile, tile, C) tiles covering it, rows of `tile_starts` in raster order."""
    h, w = image.shape[:2]
    return np.stack([image[top:top + tile, left:left + tile] for top in tile_starts(h, tile, overlap)
                     for left in tile_starts(w, tile, overlap)])


def untile(patches: np.ndarray, height: int, width: int, overlap: int = 0) -> np.ndarray:
    """The inverse of `tiles`: (N, tile, tile, C) -> (height, width, C); where tiles overlap, the mean of
    their values (rounded for integer dtypes). Tiles of a model's output at scale s untile with the image
    size and overlap times s (the starts scale with them)."""
    tile = patches.shape[1]
    tops, lefts = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(patches) != len(tops) * len(lefts):
        raise ValueError(f"{len(patches)} tiles of {tile} x {tile} do not cover a {height} x {width} image "
                         f"with overlap {overlap} (that needs {len(tops) * len(lefts)}).")
    total = np.zeros((height, width, patches.shape[-1]), np.float64)
    count = np.zeros((height, width, 1), np.float64)
    positions = [(top, left) for top in tops for left in lefts]
    for patch, (top, left) in zip(patches, positions):
        total[top:top + tile, left:left + tile] += patch
        count[top:top + tile, left:left + tile] += 1.0
    mean = total / count
    if np.issubdtype(patches.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(patches.dtype)


# ----------------------------------------------------------------------------------------- training pairs
PHOTO_SOURCES = ("skimage", "lfw", "sklearn", "folder")
PACKAGED_SOURCES = ("skimage", "lfw", "sklearn")
EVAL_SEED = 20_251_202  # the held-out photographs' degradation draws, the same in every run
PAIR_SOURCE_LENGTH = 2**62  # "endless": item i of the pair stream exists for every step a run can reach


@functools.lru_cache(maxsize=4)
def packaged_photos(source: str, channels: int) -> tuple[np.ndarray, ...]:
    """The photographs a package ships ("skimage": `SKIMAGE_PHOTOS`, "lfw": the LFW faces, "sklearn":
    `SKLEARN_PHOTOS`), read once per process and returned read-only (they are shared between callers)."""
    loaders = {"skimage": lambda: load_skimage_photos(channels=channels), "lfw": lambda: load_lfw_faces(channels),
               "sklearn": lambda: load_sklearn_photos(channels)}
    images = loaders[source]()
    for image in images:
        image.setflags(write=False)
    return tuple(images)


def load_photos(source: str, channels: int, folder: str = "") -> list[np.ndarray]:
    """Every photograph of `source` ("skimage" | "lfw" | "sklearn" | "folder", then `folder`), uint8 (H, W,
    channels)."""
    if source not in PHOTO_SOURCES:
        raise ValueError(f"config.data.source={source!r} is not a photo source; valid: {list(PHOTO_SOURCES)}.")
    if source == "folder":
        return load_folder_photos(folder, channels)
    return list(packaged_photos(source, channels))


def check_photos_config(cfg: ml_collections.ConfigDict) -> list[np.ndarray]:
    """Validates `config.data` of an image-to-image task (`kdjax.config.photos_data_config`) before any compute,
    reading the photographs (every file of a folder is opened and verified); returns them. Raises ValueError
    naming the field."""
    if cfg.source not in PHOTO_SOURCES:
        raise ValueError(f"config.data.source={cfg.source!r} is not a photo source; valid: {list(PHOTO_SOURCES)}.")
    if cfg.channels not in (1, 3):
        raise ValueError(f"config.data.channels={cfg.channels} must be 1 (grey) or 3 (RGB).")
    if cfg.num_threads < 1:
        raise ValueError(f"config.data.num_threads={cfg.num_threads} must be >= 1.")
    if cfg.eval_max_side != 0 and cfg.eval_max_side < cfg.crop:
        raise ValueError(f"config.data.eval_max_side={cfg.eval_max_side} must be 0 (whole photographs) or >= "
                         f"config.data.crop={cfg.crop}.")
    if cfg.source == "folder" and not cfg.folder:
        raise ValueError("config.data.folder is empty; data.source='folder' needs a folder of photographs.")
    extra = cfg.get("extra_validation", "")
    if extra and (extra not in PACKAGED_SOURCES or extra == cfg.source):
        raise ValueError(f"config.data.extra_validation={extra!r} must be '' (none) or a packaged photo source other "
                         f"than config.data.source={cfg.source!r}: "
                         f"{[s for s in PACKAGED_SOURCES if s != cfg.source]}.")
    try:
        images = load_photos(cfg.source, cfg.channels, cfg.folder)
        carve_validation(split_by_image(len(images), cfg.test_fraction)[0], cfg.validation_fraction)
        check_crop_size(images, cfg.crop)
    except ValueError as e:
        raise ValueError(f"config.data (source={cfg.source!r}, crop={cfg.crop}, test_fraction="
                         f"{cfg.test_fraction}, validation_fraction={cfg.validation_fraction}): {e}") from e
    return images


def split_photos(images: Sequence[np.ndarray], test_fraction: float, validation_fraction: float = 0.0
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(training, validation, test photographs): the test split by `split_by_image`, then `validation_fraction`
    of the rest by `carve_validation`; whole images, the same split in every run."""
    train, test = split_by_image(len(images), test_fraction)
    train, validation = carve_validation(train, validation_fraction)
    return [images[i] for i in train], [images[i] for i in validation], [images[i] for i in test]


def load_splits(cfg: ml_collections.ConfigDict) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(training, validation, test photographs) of `config.data`: its source split by `split_photos`, then every
    photograph of `cfg.extra_validation` (another packaged source, if set) added to the validation set. Those
    never touch training or the test set, so they enlarge the set that settings are chosen on without moving the
    split a shipped teacher was trained with."""
    train, validation, test = split_photos(load_photos(cfg.source, cfg.channels, cfg.folder), cfg.test_fraction,
                                           cfg.validation_fraction)
    if cfg.get("extra_validation", ""):
        validation = validation + load_photos(cfg.extra_validation, cfg.channels)
    return train, validation, test


def validation_origin(cfg: ml_collections.ConfigDict, num_images: int) -> str:
    """Where `load_splits`' `num_images` validation photographs come from, for a report: e.g. "2 set aside from
    the training side and the 2 of source 'sklearn'"."""
    extra = cfg.get("extra_validation", "")
    num_extra = len(load_photos(extra, cfg.channels)) if extra else 0
    carved = f"{num_images - num_extra} set aside from the training side"
    return f"{carved} and the {num_extra} of source {extra!r}" if extra else carved


def degraded_shape(name: str, params: Mapping[str, Any], crop: int, channels: int) -> tuple[int, int]:
    """(scale, extra_inputs) of a degradation, read off its output for a zero crop: scale = crop / the input's
    side (2 for x2 super-resolution, 1 otherwise), extra_inputs = the input's channels beyond the image's
    (1 for inpainting: the mask)."""
    out = degrade(name, np.zeros((1, crop, crop, channels), np.float32), np.random.default_rng(0), **params)
    return crop // out.shape[1], out.shape[-1] - channels


class PairSource:
    """Random access to training pairs for grain: item i, a pure function of (seed, i), is one random crop x crop
    patch of a photograph, the `target`, and its degraded version, the `input`, both float32 in [-1, 1].

    With rng = np.random.default_rng([seed, i]): an image index uniform in [0, N), a top-left corner uniform
    over the positions where the crop fits, then the degradation's random choices (mask, noise) from the same
    rng. The stream is endless (`PAIR_SOURCE_LENGTH` items).
    """

    def __init__(self, images: Sequence[np.ndarray], crop: int, degradation: str, params: Mapping[str, Any],
                 seed: int):
        check_crop_size(images, crop)
        self.images, self.crop, self.degradation, self.params = list(images), crop, degradation, dict(params)
        self.seed = seed

    def __len__(self) -> int:
        return PAIR_SOURCE_LENGTH

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        image = self.images[int(rng.integers(0, len(self.images)))]
        top = int(rng.integers(0, image.shape[0] - self.crop + 1))
        left = int(rng.integers(0, image.shape[1] - self.crop + 1))
        target = to_model_range(image[top:top + self.crop, left:left + self.crop][None])
        x = degrade(self.degradation, target, rng, **self.params)
        return {"input": x[0], "target": target[0]}


class PoolSource:
    """Random access to a fixed pool of training examples for grain, as an endless stream like `PairSource`:
    item i, a pure function of (seed, i), is pool entry j = rng.integers(0, N) with rng =
    np.random.default_rng([seed, POOL_SALT, i]). `pool` is a dict (nested dicts allowed, e.g. a teacher's feature
    maps) of arrays sharing their leading axis N; an item is every array's row j."""

    def __init__(self, pool: Mapping[str, Any], seed: int):
        sizes = {len(a) for a in jax.tree.leaves(pool)}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"a pool needs arrays of one common, non-zero length; got lengths {sorted(sizes)}.")
        self.pool, self.size, self.seed = pool, sizes.pop(), seed

    def __len__(self) -> int:
        return PAIR_SOURCE_LENGTH

    def index(self, i: int) -> int:
        """The pool entry item i reads."""
        return int(np.random.default_rng([self.seed, POOL_SALT, int(i)]).integers(0, self.size))

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.index(i)
        return jax.tree.map(lambda a: a[j], self.pool)


class PairBatches:
    """Batches of `PairSource` pairs, {"input", "target"} float32 (or of `PoolSource` items), random access by
    step, this process's rows.

    Global batch s holds items [s G, (s + 1) G) of the source (G the global batch size), and process p reads
    rows [p L, (p + 1) L) of it (L = G / processes), so `batch(step)` is a pure function of (seed, step,
    process) and the device and process counts do not change what a global batch holds. `iterate(start)`
    yields the same batches, prefetched by grain's threads.
    """

    def __init__(self, source: PairSource | PoolSource, global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 2):
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes.")
        local = global_batch_size // process_count
        # Local batch k*P + p of the stream is process p's part of global batch k.
        self._ds = grain.MapDataset.source(source).batch(local).slice(slice(process_index, None, process_count))
        self._num_threads = num_threads

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of the global batch at `step`."""
        return self._ds[step]

    def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps start_step, start_step + 1, ..., prefetched in background threads."""
        options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=4)
        yield from self._ds.slice(slice(start_step, None)).to_iter_dataset(options)


# ----------------------------------------------------------------------------------------- evaluation pairs
def eval_crop(image: np.ndarray, multiple: int, max_side: int = 0) -> np.ndarray:
    """The centred part of an (H, W, C) image whose sides are multiples of `multiple` and, when max_side > 0,
    at most max_side (rounded down to a multiple): offsets ((H - h) // 2, (W - w) // 2)."""
    limit = lambda side: side if max_side <= 0 else min(side, max_side)
    h, w = (limit(s) // multiple * multiple for s in image.shape[:2])
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top:top + h, left:left + w]


def eval_pairs(images: Sequence[np.ndarray], degradation: str, params: Mapping[str, Any], scale: int,
               max_side: int = 0, seed: int = EVAL_SEED) -> list[dict[str, np.ndarray]]:
    """The held-out photographs as evaluation pairs: photograph k cropped by `eval_crop(., scale, max_side)` is
    the target (1, H, W, C), its degradation with rng np.random.default_rng([seed, k]) the input; float32 in
    [-1, 1]. The same pairs in every run (the seed is fixed, not the run's)."""
    pairs = []
    for k, image in enumerate(images):
        target = to_model_range(eval_crop(image, scale, max_side)[None])
        x = degrade(degradation, target, np.random.default_rng([seed, k]), **params)
        pairs.append({"input": x, "target": target})
    return pairs
