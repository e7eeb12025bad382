"""extract_features on 8 (fake CPU) devices equals the plain single-device computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.evaluation import features


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return {"map": h, "pool": nn.Dense(5, name="head")(h.mean(axis=(1, 2)))}


@pytest.fixture(scope="module")
def net():
    model = _TinyNet()
    x = np.random.default_rng(0).standard_normal((37, 8, 8, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), x[:1])
    return model, params, x


def _unsharded(model, params, x):
    return jax.tree.map(np.asarray, jax.device_get(model.apply(params, jax.device_put(x, jax.devices()[0]))))


def test_sharded_extraction_equals_unsharded_with_uneven_last_batch(net):
    model, params, x = net
    assert jax.device_count() == 8
    got = features.extract_features(model.apply, x, batch_size=16, params=params)  # 16 + 16 + 5 (padded)
    want = _unsharded(model, params, x)
    for key in ("map", "pool"):
        assert got[key].dtype == np.float64 and got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_batch_size_is_rounded_up_to_the_device_count_and_num_samples_cuts(net):
    model, params, x = net
    calls = []

    def fn(p, batch):
        calls.append(batch.shape)  # traced once per compilation
        return model.apply(p, batch)["pool"]

    got = features.extract_features(fn, x, batch_size=10, params=params, num_samples=30, out_dtype=None)
    assert calls == [(16, 8, 8, 3)]
    assert got.dtype == np.float32 and got.shape == (30, 5)
    np.testing.assert_allclose(got, _unsharded(model, params, x[:30])["pool"], rtol=1e-5, atol=1e-6)


def test_callable_source_and_closure_fn(net):
    model, params, x = net

    def sample(step):  # a "generator": 12 images per step, from a deterministic stream
        return jnp.asarray(x[(12 * step) % 36:(12 * step) % 36 + 12])

    got = features.extract_features(lambda b: model.apply(params, b)["pool"], sample, batch_size=16,
                                    num_samples=30)
    stream = np.concatenate([x[0:12], x[12:24], x[24:36]])[:30]
    np.testing.assert_allclose(got, _unsharded(model, params, stream)["pool"], rtol=1e-5, atol=1e-6)


def test_inputs_are_sharded_over_all_devices(net):
    model, params, x = net
    seen = []

    def fn(batch):
        jax.debug.inspect_array_sharding(batch, callback=seen.append)
        return batch.sum(axis=(1, 2, 3))

    got = features.extract_features(fn, x, batch_size=8)
    np.testing.assert_allclose(got, x.astype(np.float64).sum(axis=(1, 2, 3)), rtol=1e-5)
    assert len(seen[0].device_set) == 8


def test_errors():
    with pytest.raises(ValueError, match="num_samples"):
        features.extract_features(lambda b: b, lambda step: np.zeros((8, 2)), batch_size=8)
    with pytest.raises(ValueError, match="expected 1..8"):
        features.extract_features(lambda b: b, lambda step: np.zeros((9, 2)), batch_size=8, num_samples=9)
