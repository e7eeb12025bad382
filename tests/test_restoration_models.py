"""Image-to-image models (EDSR, ESPCN, U-Net): pixel shuffle against numpy and PyTorch, shapes at every scale
and at odd sizes (no compute), parameter counts against the hand-written formula, the global residual, the
named features, bfloat16 compute, and the student's FLOPs budget against the teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdjax import models
from kdjax.evaluation import cost
from kdjax.models import restoration

RNGS = {"params": jax.random.key(0, impl="rbg")}  # 'rbg': XLA:CPU compiles threefry draws slowly
SMALL = {"edsr": {"num_features": 8, "num_blocks": 2}, "espcn": {"features": (8, 4)}, "unet": {"widths": (4, 8)}}


def _abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _conv(k, cin, cout):
    """Parameters of a k x k conv with bias."""
    return k * k * cin * cout + cout


def _random_variables(model, x, seed=0):
    """Variables of `model` for input x, drawn here from N(0, 0.1^2) (compiling Flax's init costs ~1 s a model)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, RNGS, _abstract(x.shape))
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _shapes(model, x_shape, **kw):
    (out, feats), variables = jax.eval_shape(
        functools.partial(model.init_with_output, return_features=True, **kw), RNGS, _abstract(x_shape))
    return out, feats, variables


# ------------------------------------------------------------------------------------------ depth_to_space
@pytest.mark.parametrize("r", [2, 3, 4])
def test_depth_to_space_matches_numpy_and_torch(r):
    rng = np.random.default_rng(r)
    b, h, w, c = 2, 3, 5, 2
    x = rng.standard_normal((b, h, w, c * r * r)).astype(np.float32)
    out = np.asarray(restoration.depth_to_space(jnp.asarray(x), r))
    # The definition, one strided slice per (c, i, j): out[b, h r + i, w r + j, c] = x[b, h, w, c r^2 + i r + j].
    ref = np.zeros((b, h * r, w * r, c), np.float32)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                ref[:, i::r, j::r, ch] = x[..., ch * r * r + i * r + j]
    np.testing.assert_array_equal(out, ref)
    expected = torch.nn.functional.pixel_shuffle(torch.from_numpy(x).permute(0, 3, 1, 2), r).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(out, expected.numpy())
    with pytest.raises(ValueError, match="divisible"):
        restoration.depth_to_space(jnp.zeros((1, 2, 2, 5)), 2)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("hw", [(12, 20), (13, 7)])
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["edsr", "espcn"])
def test_super_resolution_shapes_and_features(name, scale, hw):
    model = models.build_model(name, channels=3, scale=scale, **SMALL[name])
    assert model.spec == models.ImageToImageSpec(3, 3, scale)
    out, feats, variables = _shapes(model, (2, *hw, 3))
    h, w = hw
    assert out.shape == (2, h * scale, w * scale, 3) and out.dtype == jnp.float32
    assert set(variables) == {"params"}
    if name == "edsr":
        assert set(feats) == {"head", "body1", "body2", "body"}
        assert all(f.shape == (2, h, w, 8) for f in feats.values())
        stages = {1: 0, 2: 1, 3: 1, 4: 2}[scale]  # pixel-shuffle convs; scale 1 has no upsampler parameters
        assert set(variables["params"].get("upsampler", {})) == {f"conv{i + 1}" for i in range(stages)}
    else:
        assert feats["hidden1"].shape == (2, h, w, 8) and feats["hidden2"].shape == (2, h, w, 4)
        assert set(feats) == {"hidden1", "hidden2"}


@pytest.mark.parametrize("hw", [(12, 20), (13, 21), (8, 8)])
@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
def test_unet_shapes_and_features(upsample, hw):
    model = models.build_model("unet", channels=3, extra_inputs=1, widths=(4, 8, 16), upsample=upsample,
                               norm_groups=2)
    assert model.spec == models.ImageToImageSpec(4, 3, 1)
    out, feats, _ = _shapes(model, (2, *hw, 4))
    h, w = hw
    assert out.shape == (2, h, w, 3) and out.dtype == jnp.float32
    assert set(feats) == {"bottleneck", "dec1", "dec0"}
    ceil = lambda n, level: -(-n // 2**level)  # noqa: E731
    assert feats["bottleneck"].shape == (2, ceil(h, 2), ceil(w, 2), 16)
    assert feats["dec1"].shape == (2, ceil(h, 1), ceil(w, 1), 8)
    assert feats["dec0"].shape == (2, h, w, 4)


def test_registry_data_fields_and_errors():
    assert models.names_of_kind("image_to_image") == ["edsr", "espcn", "unet"]
    for name in ("edsr", "espcn", "unet"):
        assert models.data_kwargs(name, resolution=32, channels=1, num_classes=0) == {"channels": 1}
        assert models.data_parallel_kwargs(name, "batch") == {}
        # The data's channels plus extra_inputs are the input's; the input must have them.
        model = models.build_model(name, channels=1, extra_inputs=1, **SMALL[name])
        assert model.spec.in_channels == 2 and model.spec.out_channels == 1
        with pytest.raises(ValueError, match=r"\(B, H, W, 2\)"):
            jax.eval_shape(model.init, RNGS, _abstract((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="scale must be 1, 3 or a power of two"):
        jax.eval_shape(restoration.EDSR(scale=5, **SMALL["edsr"]).init, RNGS, _abstract((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="activation"):
        jax.eval_shape(restoration.ESPCN(activation="gelu").init, RNGS, _abstract((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="upsample"):
        jax.eval_shape(restoration.UNet(upsample="bilinear").init, RNGS, _abstract((1, 8, 8, 3)))


# ------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_edsr_parameter_count(scale):
    f, n, c = 64, 8, 3
    upsampler = {1: 0, 2: _conv(3, f, 4 * f), 3: _conv(3, f, 9 * f), 4: 2 * _conv(3, f, 4 * f)}[scale]
    expected = _conv(3, c, f) + n * 2 * _conv(3, f, f) + _conv(3, f, f) + upsampler + _conv(3, f, c)
    _, _, variables = _shapes(restoration.EDSR(scale=scale), (1, 8, 8, 3))
    assert cost.count_params(variables) == expected
    if scale == 2:
        assert expected == 779_011  # the documented default


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_espcn_parameter_count(scale):
    c = 3
    expected = _conv(5, c, 64) + _conv(3, 64, 32) + _conv(3, 32, c * scale**2)
    _, _, variables = _shapes(restoration.ESPCN(scale=scale), (1, 8, 8, 3))
    assert cost.count_params(variables) == expected
    if scale == 2:
        assert expected == 26_796


def test_unet_parameter_count():
    c, (a, b, d) = 3, (32, 64, 128)
    expected = (_conv(3, c + 1, a) + _conv(3, a, a) + _conv(3, a, b) + _conv(3, b, b) + _conv(3, b, d) + _conv(3, d, d)
                + _conv(3, d + b, b) + _conv(3, b, b) + _conv(3, b + a, a) + _conv(3, a, a) + _conv(1, a, c))
    _, _, variables = _shapes(restoration.UNet(extra_inputs=1), (1, 8, 8, 4))
    assert cost.count_params(variables) == expected


# ------------------------------------------------------------------------------------------ global residual
@pytest.mark.parametrize("name,scale", [("edsr", 1), ("edsr", 3), ("espcn", 2), ("unet", 1)])
def test_global_residual_is_the_resized_input_when_the_tail_is_zero(name, scale):
    kw = dict(SMALL[name], channels=3, extra_inputs=1)
    if name != "unet":
        kw["scale"] = scale
    x = jax.random.uniform(jax.random.key(1), (2, 6, 10, 4), minval=-1.0, maxval=1.0)
    model = models.build_model(name, **kw)
    variables = _random_variables(model, x)
    params = dict(variables["params"])
    params["tail"] = jax.tree.map(jnp.zeros_like, params["tail"])
    plain_model = model.clone(global_residual=False)

    @jax.jit
    def run(zero_tail, live, x):  # one compile for the three forward passes
        return model.apply(zero_tail, x), plain_model.apply(zero_tail, x), model.apply(live, x)

    out, plain, live = run({"params": params}, variables, x)
    expected = x[..., :3] if scale == 1 else jax.image.resize(x[..., :3], (2, 6 * scale, 10 * scale, 3), "linear")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
    # Without the residual path the same network outputs zeros; with a live tail it is not the resize.
    np.testing.assert_array_equal(np.asarray(plain), 0.0)
    assert not np.allclose(np.asarray(live), np.asarray(expected), atol=1e-3)


# ------------------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("name", ["edsr", "espcn", "unet"])
def test_bfloat16_compute_keeps_float32_params_and_outputs(name):
    x = jax.random.uniform(jax.random.key(2), (2, 8, 12, 3), minval=-1.0, maxval=1.0)
    model = models.build_model(name, **SMALL[name])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jax.eval_shape(model.init, RNGS, x)))
    variables = _random_variables(model, x)
    model16 = model.clone(dtype=jnp.bfloat16)
    out32, (out16, feats) = jax.jit(lambda v, x: (model.apply(v, x), model16.apply(v, x, return_features=True)))(
        variables, x)
    assert out16.dtype == jnp.float32 and out16.shape == out32.shape
    assert all(f.dtype == jnp.bfloat16 for f in feats.values())
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.1)


# ------------------------------------------------------------------------------------------ cost
def test_student_has_a_tenth_of_the_teacher_flops():
    """Default EDSR vs default ESPCN at x2 on 32x32 RGB inputs (measured on CPU: 1541 vs 53 MFLOPs/image)."""
    flops = {}
    for name in ("edsr", "espcn"):
        model = models.build_model(name, scale=2)
        x = _abstract((4, 32, 32, 3))
        variables = jax.eval_shape(model.init, RNGS, x)
        flops[name] = cost.flops_per_image(lambda v, x, m=model: m.apply(v, x), variables, x, batch_size=4)
    assert 0.5e9 < flops["edsr"] < 3e9
    assert flops["edsr"] >= 10 * flops["espcn"], flops
