"""Image data for kdjax: the embedded `digits`, any TFDS image dataset, or a folder of image files.

One config field, `config.data.source`, picks the source:
- "digits": scikit-learn's bundled handwritten digits (1797 real 8x8 grey images, labels 0-9),
  offline, resized to `config.data.resolution`, with a fixed held-out split (`test_fraction`);
- "tfds": any TFDS image dataset by `name` (mnist, fashion_mnist, cifar10, celeb_a, ...), read with
  `tfds.data_source` (array_record format) from `data_dir`; it downloads and prepares where a network
  exists (`download=True`);
- "folder": a folder of png/jpg/bmp/webp files, optionally one sub-folder per class; every file is opened
  and verified by `check_data_config`, before any compute, and the unreadable ones are named in one error.

Every source becomes a random-access sequence of (image, label) examples, resized (centre-cropped to
a square first) to `resolution` x `resolution` with `channels` channels, as uint8. Batches come from a
grain `MapDataset` pipeline: shuffled per epoch with the config seed, endless, and *random access by
step*, so the batch at step s is a pure function of (seed, s) and a resumed run reads exactly the
batches an uninterrupted one would. Each process reads only its own slice of every global batch
(rows [p*L, (p+1)*L) for process p and L = global batch / process count). Images come out NHWC float32
scaled to [-1, 1]; labels int32 (0 for unlabelled data).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from kdjax.core.images import to_model_range

SOURCES = ("digits", "tfds", "folder")
VALIDATION_SEED = 20_251_130  # the validation split's permutation, apart from the test split's
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------- examples
def prepare_image(image: np.ndarray | Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Any image -> centre square crop -> (resolution, resolution, channels) uint8 (bicubic resize)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array)
    image = image.convert("L" if channels == 1 else "RGB")
    # PIL.ImageOps.fit centres its crop box to the sub-pixel, so on images whose side difference is odd it
    # resamples differently (measured: up to 143 grey levels on one pixel); this integer crop is kept.
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, np.uint8)
    return array[..., None] if channels == 1 else array


class ArraySource:
    """Random access over in-memory arrays of prepared uint8 images and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[i], "label": self.labels[i]}


class FolderSource:
    """Random access over image files; each is decoded and resized when read."""

    def __init__(self, files: Sequence[pathlib.Path], labels: Sequence[int], resolution: int, channels: int):
        self.files, self.labels = list(files), np.asarray(labels, np.int32)
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        path = self.files[i]
        try:
            with Image.open(path) as image:
                array = prepare_image(image, self.resolution, self.channels)
        except Exception as e:  # PIL raises many types; the user needs the file name.
            raise ValueError(f"Unreadable image file {str(path)!r}: {e}") from e
        return {"image": array, "label": self.labels[i]}


class TfdsSource:
    """Random access over a TFDS split (array_record `data_source`), resized when read."""

    def __init__(self, source: Sequence[dict], image_key: str, label_key: str, resolution: int, channels: int):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        example = self.source[i]
        image = prepare_image(example[self.image_key], self.resolution, self.channels)
        label = np.int32(example[self.label_key]) if self.label_key else np.int32(0)
        return {"image": image, "label": label}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's train, held-out test and (optional) validation splits, as random-access sources of prepared
    examples. The validation split is carved out of the training images (`validation_fraction`), so settings
    can be chosen on it and reported on the test split."""

    name: str
    train: Sequence[dict]
    test: Sequence[dict]
    num_classes: int  # 0 when the data carries no labels
    resolution: int
    channels: int
    validation: Sequence[dict] = ()


class Subset:
    """Random access to the examples `indices` of a source."""

    def __init__(self, source: Sequence[dict], indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[i])]


# ----------------------------------------------------------------------------------------- loading
def _fixed_split(n: int, test_fraction: float, seed: int = 20_151_109) -> tuple[np.ndarray, np.ndarray]:
    """A held-out split fixed for all runs (seeded independently of the run seed): (kept, held out)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _load_digits(cfg: ml_collections.ConfigDict) -> Dataset:
    from sklearn.datasets import load_digits  # ships with scikit-learn; no download

    digits = load_digits()
    raw = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16
    images = np.stack([prepare_image(im, cfg.resolution, cfg.channels) for im in raw])
    train_idx, test_idx = _fixed_split(len(images), cfg.test_fraction)
    return Dataset("digits", ArraySource(images[train_idx], digits.target[train_idx]),
                   ArraySource(images[test_idx], digits.target[test_idx]), 10, cfg.resolution, cfg.channels)


def _folder_files(root: pathlib.Path) -> tuple[list[pathlib.Path], list[int], int]:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    with_images = [d for d in subdirs if any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())]
    if with_images:  # one class per sub-folder, classes in sorted name order
        files, labels = [], []
        for label, d in enumerate(with_images):
            for p in sorted(d.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(p), labels.append(label)
        return files, labels, len(with_images)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files, [0] * len(files), 0


@functools.lru_cache(maxsize=8)
def _unreadable_files(files: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    """(path, reason) of every file that PIL cannot open and verify (header, chunk sums, truncation), for
    `files` given as (path, size, mtime_ns): the cache key changes when a file does."""
    bad = []
    for path, _, _ in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError, ...
            bad.append((path, f"{type(e).__name__}: {e}".splitlines()[0]))
    return tuple(bad)


def check_image_files(files: Sequence[pathlib.Path], field: str = "config.data.folder") -> None:
    """Raises ValueError naming every unreadable (empty, truncated, corrupt) image file, before any compute."""
    stats = tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in ((p, p.stat()) for p in files))
    bad = _unreadable_files(stats)
    if bad:
        shown = "; ".join(f"{path!r} ({reason})" for path, reason in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{field}: {len(bad)} of {len(files)} image files are unreadable: {shown}{more}. Remove "
                         "or replace them.")


def _load_folder(cfg: ml_collections.ConfigDict) -> Dataset:
    root = pathlib.Path(cfg.folder).expanduser()
    files, labels, num_classes = _folder_files(root)  # check_data_config has verified every file
    train_idx, test_idx = _fixed_split(len(files), cfg.test_fraction)
    pick = lambda idx: FolderSource([files[i] for i in idx], [labels[i] for i in idx], cfg.resolution, cfg.channels)
    return Dataset(root.name, pick(train_idx), pick(test_idx), num_classes, cfg.resolution, cfg.channels)


def _load_tfds(cfg: ml_collections.ConfigDict) -> Dataset:
    import tensorflow_datasets as tfds

    data_dir = cfg.data_dir or None
    builder = tfds.builder(cfg.name, data_dir=data_dir)
    features = builder.info.features
    label_key = cfg.label_key
    num_classes = int(features[label_key].num_classes) if label_key else 0
    sources = tfds.data_source(cfg.name, split=[cfg.train_split, cfg.test_split], data_dir=data_dir,
                               download=cfg.download)
    wrap = lambda src: TfdsSource(src, cfg.image_key, label_key, cfg.resolution, cfg.channels)
    return Dataset(cfg.name, wrap(sources[0]), wrap(sources[1]), num_classes, cfg.resolution, cfg.channels)


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Validates `config.data` before any compute; raises ValueError naming the bad field."""
    if cfg.source not in SOURCES:
        raise ValueError(f"config.data.source={cfg.source!r} is not a data source; valid: {list(SOURCES)}.")
    if cfg.channels not in (1, 3):
        raise ValueError(f"config.data.channels={cfg.channels} must be 1 (grey) or 3 (RGB).")
    if not 4 <= cfg.resolution <= 4096:
        raise ValueError(f"config.data.resolution={cfg.resolution} must be between 4 and 4096 pixels.")
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"config.data.test_fraction={cfg.test_fraction} must be in (0, 1).")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ValueError(f"config.data.validation_fraction={cfg.validation_fraction} must be in [0, 1) "
                         "(0 = no validation split).")
    if cfg.source == "folder":
        root = pathlib.Path(cfg.folder).expanduser() if cfg.folder else None
        if root is None or not root.is_dir():
            raise ValueError(f"config.data.folder={cfg.folder!r} is not an existing directory "
                             "(data.source='folder' needs a folder of images, optionally one sub-folder per class).")
        files, _, _ = _folder_files(root)
        if len(files) < 2:
            raise ValueError(f"config.data.folder={cfg.folder!r} holds {len(files)} image files "
                             f"(suffixes {list(IMAGE_SUFFIXES)}); at least 2 are needed.")
        check_image_files(files)
    if cfg.source == "tfds":
        import tensorflow_datasets as tfds

        if not cfg.name:
            raise ValueError("config.data.name is empty; data.source='tfds' needs a TFDS dataset name "
                             "such as 'mnist', 'fashion_mnist', 'cifar10' or 'celeb_a'.")
        try:
            builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
        except Exception as e:  # DatasetNotFoundError and friends
            raise ValueError(f"config.data.name={cfg.name!r} is not a TFDS dataset this installation knows "
                             f"({type(e).__name__}); see tfds.list_builders() for valid names.") from e
        features = builder.info.features
        for field in ("image_key", "label_key"):
            key = cfg[field]
            if key and key not in features:
                raise ValueError(f"config.data.{field}={key!r} is not a feature of TFDS dataset {cfg.name!r}; "
                                 f"its features: {sorted(features.keys())}" + (" (use '' for unlabelled data)."
                                                                              if field == "label_key" else "."))
        if cfg.data_dir and not cfg.download and not os.path.isdir(cfg.data_dir):
            raise ValueError(f"config.data.data_dir={cfg.data_dir!r} does not exist and download=False.")


def all_images(source: Sequence[dict]) -> np.ndarray:
    """Every image of a split, (N, H, W, C) float32 in [-1, 1] (the real set of an evaluation)."""
    return to_model_range(np.stack([source[i]["image"] for i in range(len(source))]))


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads the dataset `cfg` (= `config.data`) names, after `check_data_config`."""
    check_data_config(cfg)
    dataset = {"digits": _load_digits, "folder": _load_folder, "tfds": _load_tfds}[cfg.source](cfg)
    if cfg.validation_fraction > 0:  # a fixed part of the training images, never trained on
        keep, held = _fixed_split(len(dataset.train), cfg.validation_fraction, seed=VALIDATION_SEED)
        dataset = dataclasses.replace(dataset, train=Subset(dataset.train, keep),
                                      validation=Subset(dataset.train, held))
    return dataset


# ----------------------------------------------------------------------------------------- batches
class TrainBatches:
    """Endless shuffled batches, random access by step, this process's rows only.

    `batch(step)` is a pure function of (source, seed, global_batch_size, step, process); iterating
    from a step prefetches the same batches with background threads.
    """

    def __init__(self, source: Sequence[dict], global_batch_size: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None, num_threads: int = 2):
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes.")
        self.local_batch_size = global_batch_size // process_count
        stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)  # reshuffled every epoch
        # Local batch k*P + p of the stream is process p's part of global batch k.
        self._ds = stream.batch(self.local_batch_size).slice(slice(process_index, None, process_count))
        self._num_threads = num_threads

    @staticmethod
    def _finish(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": to_model_range(batch["image"]), "label": batch["label"].astype(np.int32)}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of the global batch at `step`."""
        return self._finish(self._ds[step])

    def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps start_step, start_step + 1, ..., prefetched in background threads."""
        options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=4)
        for batch in self._ds.slice(slice(start_step, None)).to_iter_dataset(options):
            yield self._finish(batch)


def eval_batches(source: Sequence[dict], global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over a split in global batches, this process's rows only.

    The last batch is padded (by repeating the first example) to full size; `mask` is 1 on real
    examples, so metrics over the concatenated (gathered) outputs can drop the padding.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = global_batch_size // process_count
    n = len(source)
    for start in range(0, n, global_batch_size):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = idx < n
        examples = [source[int(i) if i < n else 0] for i in idx]
        yield {"image": to_model_range(np.stack([e["image"] for e in examples])),
               "label": np.asarray([e["label"] for e in examples], np.int32),
               "mask": mask.astype(np.float32)}
