"""Data sources and batches: determinism, epochs, host sharding, folders, TFDS (mock), bad input."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from kdjax.config import data_config
from kdjax.core import data


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(data_config(source="digits", resolution=16, channels=1))


def test_digits_split_and_range(digits):
    assert len(digits.train) + len(digits.test) == 1797 and digits.num_classes == 10
    assert 300 < len(digits.test) < 400
    example = digits.train[0]
    assert example["image"].shape == (16, 16, 1) and example["image"].dtype == np.uint8
    train_imgs = {digits.train[i]["image"].tobytes() for i in range(len(digits.train))}
    assert not any(digits.test[i]["image"].tobytes() in train_imgs for i in range(20))  # held out
    batch = data.TrainBatches(digits.train, 32, seed=0, process_index=0, process_count=1).batch(0)
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0 and batch["image"].max() > 0.9
    rgb = data.load_dataset(data_config(source="digits", resolution=8, channels=3))
    assert rgb.train[0]["image"].shape == (8, 8, 3)


def test_batches_are_a_function_of_seed_and_step(digits):
    a = data.TrainBatches(digits.train, 16, seed=3, process_index=0, process_count=1)
    b = data.TrainBatches(digits.train, 16, seed=3, process_index=0, process_count=1)
    c = data.TrainBatches(digits.train, 16, seed=4, process_index=0, process_count=1)
    np.testing.assert_array_equal(a.batch(7)["image"], b.batch(7)["image"])
    assert not np.array_equal(a.batch(7)["image"], c.batch(7)["image"])
    assert not np.array_equal(a.batch(7)["image"], a.batch(8)["image"])
    # The prefetching iterator from step k yields exactly batch(k), batch(k+1), ...
    it = a.iterate(5)
    for step in range(5, 9):
        np.testing.assert_array_equal(next(it)["label"], a.batch(step)["label"])


def test_every_epoch_is_a_fresh_permutation():
    source = data.ArraySource(np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1), np.arange(12))
    batches = data.TrainBatches(source, 4, seed=0, process_index=0, process_count=1)
    labels = [batches.batch(s)["label"] for s in range(9)]  # 3 epochs of 12
    epochs = [np.sort(np.concatenate(labels[3 * e:3 * e + 3])) for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(e, np.arange(12))  # each example exactly once per epoch
    order = [np.concatenate(labels[3 * e:3 * e + 3]) for e in range(3)]
    assert not np.array_equal(order[0], order[1])  # reshuffled


def test_processes_read_disjoint_rows_of_the_same_global_batch(digits):
    single = data.TrainBatches(digits.train, 24, seed=1, process_index=0, process_count=1)
    parts = [data.TrainBatches(digits.train, 24, seed=1, process_index=p, process_count=3) for p in range(3)]
    for step in (0, 11, 100):
        stacked = np.concatenate([p.batch(step)["image"] for p in parts])
        np.testing.assert_array_equal(stacked, single.batch(step)["image"])


def test_eval_batches_cover_the_split_once(digits):
    batches = list(data.eval_batches(digits.test, 64, process_index=0, process_count=1))
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, [digits.test[i]["label"] for i in range(len(digits.test))])


def _write_images(folder, n, size=(20, 12), color=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if color else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"img{i}.png")


def test_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path / "cats", 6)
    _write_images(tmp_path / "dogs", 4, color=False)
    ds = data.load_dataset(data_config(source="folder", folder=str(tmp_path), resolution=8, channels=3,
                                       test_fraction=0.2))
    assert ds.num_classes == 2 and len(ds.train) + len(ds.test) == 10
    labels = sorted(int(ds.train[i]["label"]) for i in range(len(ds.train))) + \
        sorted(int(ds.test[i]["label"]) for i in range(len(ds.test)))
    assert labels.count(0) + labels.count(1) == 10 and set(labels) == {0, 1}
    assert ds.train[0]["image"].shape == (8, 8, 3)  # centre-cropped 20x12 -> 12x12 -> 8x8


def test_flat_folder_is_unlabelled(tmp_path):
    _write_images(tmp_path, 5)
    ds = data.load_dataset(data_config(source="folder", folder=str(tmp_path), resolution=4, channels=1))
    assert ds.num_classes == 0 and ds.train[0]["image"].shape == (4, 4, 1)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        data.load_dataset(data_config(source="folder", folder=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 image files"):
        data.load_dataset(data_config(source="folder", folder=str(tmp_path / "empty")))
    _write_images(tmp_path / "bad", 3)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_dataset(data_config(source="folder", folder=str(tmp_path / "bad")))


def test_bad_source_and_fields():
    with pytest.raises(ValueError, match="valid: \\['digits', 'tfds', 'folder'\\]"):
        data.check_data_config(data_config(source="imagenet"))
    with pytest.raises(ValueError, match="channels"):
        data.check_data_config(data_config(channels=2))
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        data.check_data_config(data_config(source="tfds", name="no_such_dataset_xyz"))
    with pytest.raises(ValueError, match="label_key='class'"):
        data.check_data_config(data_config(source="tfds", name="mnist", label_key="class"))


def test_tfds_source_on_mock_data():
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(data_config(source="tfds", name="mnist", resolution=16, channels=1))
        assert ds.num_classes == 10 and len(ds.train) == 40
        batch = data.TrainBatches(ds.train, 8, seed=0, process_index=0, process_count=1).batch(2)
        assert batch["image"].shape == (8, 16, 16, 1) and batch["label"].dtype == np.int32
        assert set(np.unique(batch["label"])) <= set(range(10))


def test_every_unreadable_image_is_named_before_any_compute_and_a_fixed_folder_passes(tmp_path):
    _write_images(tmp_path / "a", 3)
    _write_images(tmp_path / "b", 3, color=False)
    good = (tmp_path / "a" / "img0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    cfg = data_config(source="folder", folder=str(tmp_path), resolution=8, channels=1)
    with pytest.raises(ValueError, match=r"2 of 8 image files are unreadable: .*truncated\.png.*empty\.jpg") as e:
        data.check_data_config(cfg)  # the config check the launcher runs before compute
    assert "\n" not in str(e.value)
    (tmp_path / "a" / "truncated.png").write_bytes(good)  # fixed: the cached verdict does not stick
    (tmp_path / "b" / "empty.jpg").unlink()
    data.check_data_config(cfg)


def test_validation_split_is_carved_from_train_fixed_and_disjoint():
    plain = data.load_dataset(data_config(resolution=8))
    split = data.load_dataset(data_config(resolution=8, validation_fraction=0.1))
    assert len(split.validation) == round(0.1 * len(plain.train)) and len(plain.validation) == 0
    assert len(split.train) + len(split.validation) == len(plain.train) and len(split.test) == len(plain.test)
    key = lambda e: (e["image"].tobytes(), int(e["label"]))
    train = {key(split.train[i]) for i in range(len(split.train))}
    val = [key(split.validation[i]) for i in range(len(split.validation))]
    test = {key(split.test[i]) for i in range(len(split.test))}
    assert not train & set(val) and not test & set(val)  # (digits has a few duplicate images; none cross here)
    again = data.load_dataset(data_config(resolution=8, validation_fraction=0.1))
    assert [key(again.validation[i]) for i in range(len(again.validation))] == val
    with pytest.raises(ValueError, match="validation_fraction=1.0 must be in \\[0, 1\\)"):
        data.check_data_config(data_config(validation_fraction=1.0))
