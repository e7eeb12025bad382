"""DCGAN student generator and discriminator: shapes (no compute), BatchNorm state, features, the
sub-pixel / transposed-conv equivalence, cross-device BatchNorm, and the student's FLOPs budget."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kdjax.evaluation import cost
from kdjax.models import build_model, dcgan

RESOLUTIONS = [16, 32, 64, 128, 256, 512, 1024]
# 'rbg' keys: XLA:CPU compiles threefry random draws slowly (a small D's jitted init took 8.9 s to
# compile with threefry, 1.3 s with rbg); the parameter values do not matter here.
RNGS = {"params": jax.random.key(0, impl="rbg")}


def _abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _init(module, *args):
    return jax.jit(module.init)(RNGS, *args)


def _apply(module, **kw):
    """module.apply with fixed keyword arguments, jitted (one compile instead of one per op)."""
    return jax.jit(functools.partial(module.apply, **kw))


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_generator_shapes(resolution, num_classes):
    g = dcgan.Generator(resolution=resolution, num_classes=num_classes, z_dim=64)
    labels = _abstract((2,), jnp.int32) if num_classes else None
    (images, feats), variables = jax.eval_shape(
        functools.partial(g.init_with_output, return_features=True), RNGS, _abstract((2, 64)), labels)
    assert images.shape == (2, resolution, resolution, 3) and images.dtype == jnp.float32
    stages = [2**k for k in range(2, int(np.log2(resolution)) + 1)]
    assert set(feats) == {f"res{r}" for r in stages}
    channels = g.stage_channels()
    for r in stages:
        assert feats[f"res{r}"].shape == (2, r, r, channels[r])
    assert set(variables) == {"params", "batch_stats"}
    assert ("class_embed" in variables["params"]) == bool(num_classes)


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_discriminator_shapes(resolution, num_classes):
    d = dcgan.Discriminator(resolution=resolution, num_classes=num_classes)
    labels = _abstract((3,), jnp.int32) if num_classes else None
    logits, variables = jax.eval_shape(d.init_with_output, RNGS,
                                       _abstract((3, resolution, resolution, 3)), labels)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    assert set(variables) == {"params"}  # no BatchNorm by default
    assert min(d.stage_channels()) == 4


def test_channel_schedule_and_registry():
    g = build_model("dcgan_generator", resolution=64, width=16, width_max=64)
    assert g.stage_channels() == {4: 64, 8: 64, 16: 64, 32: 32, 64: 16}
    d = build_model("dcgan_discriminator", resolution=64, width=16, width_max=64)
    assert d.stage_channels() == {32: 16, 16: 32, 8: 64, 4: 64}
    with pytest.raises(ValueError, match="power of two"):
        dcgan.Generator(resolution=48).stage_channels()
    with pytest.raises(ValueError, match="power of two"):
        dcgan.Discriminator(resolution=8).stage_channels()
    with pytest.raises(ValueError, match="upsample"):
        jax.eval_shape(dcgan.Generator(upsample="bilinear").init, RNGS, _abstract((1, 128)))
    with pytest.raises(ValueError, match="labels are required"):
        jax.eval_shape(dcgan.Generator(num_classes=3).init, RNGS, _abstract((1, 128)))


def test_upsample_modes_same_shapes():
    shapes = {}
    for mode in dcgan.UPSAMPLE_MODES:
        g = dcgan.Generator(resolution=32, upsample=mode)
        (img, feats), _ = jax.eval_shape(functools.partial(g.init_with_output, return_features=True),
                                         RNGS, _abstract((4, 128)))
        shapes[mode] = (img.shape, {k: v.shape for k, v in feats.items()})
    assert shapes["subpixel"] == shapes["transpose"] == shapes["resize"]


def test_batch_stats_update_in_train_mode_only():
    g = dcgan.Generator(resolution=16, width=8, width_max=16, z_dim=16)
    z = jax.random.normal(jax.random.key(1), (8, 16))
    variables = _init(g, z)
    assert set(variables["batch_stats"]) == {"bn4", "bn8", "bn16"}
    assert set(variables["params"]["bn8"]) == {"scale", "bias"}  # running stats are not params
    images, updates = _apply(g, train=True, mutable=["batch_stats"])(variables, z)
    assert np.all(np.abs(images) <= 1.0)
    old, new = variables["batch_stats"]["bn8"], updates["batch_stats"]["bn8"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
    # Eval mode reads the running averages and needs no mutable collection.
    a = _apply(g)(variables, z)
    b = _apply(g)({**variables, **updates}, z)
    assert a.shape == (8, 16, 16, 3) and not np.allclose(a, b)


def test_conditioning_changes_outputs():
    g = dcgan.Generator(resolution=16, width=8, width_max=16, z_dim=16, num_classes=5)
    d = dcgan.Discriminator(resolution=16, width=8, num_classes=5)

    @jax.jit
    def outputs(z, x):  # one compile for all of it
        zeros, ones = jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32)
        gv, dv = g.init(RNGS, z, zeros), d.init(RNGS, x, zeros)
        return (g.apply(gv, z, zeros), g.apply(gv, z, ones), d.apply(dv, x, zeros), d.apply(dv, x, ones))

    g0, g1, d0, d1 = outputs(jax.random.normal(jax.random.key(1), (4, 16)),
                             jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1))
    assert not np.allclose(g0, g1) and not np.allclose(d0, d1)


def test_discriminator_logit_is_per_image():
    """Without BatchNorm a logit depends only on its own image (so R1 is well defined)."""
    d = dcgan.Discriminator(resolution=16, width=8)

    @jax.jit
    def logits(x):
        v = d.init(RNGS, x)
        return d.apply(v, x), d.apply(v, x.at[1:].set(0.0))

    full, others_zeroed = logits(jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1))
    np.testing.assert_allclose(others_zeroed[0], full[0], rtol=1e-6)
    assert not np.allclose(others_zeroed[1:], full[1:])


def test_subpixel_kernel_equals_conv_transpose():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    m = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
    v = _init(m, x)
    expected = _apply(m)(v, x)
    k3 = dcgan.subpixel_kernel_from_transpose(v["params"]["kernel"])
    got = dcgan.depth_to_space(jax.lax.conv_general_dilated(
        x, k3, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    assert got.shape == expected.shape == (2, 10, 12, 4)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_subpixel_generator_reproduces_transpose_generator():
    """A 'transpose' generator's weights, converted, give the same images in 'subpixel' mode."""
    kw = dict(resolution=16, width=8, width_max=16, z_dim=16)
    gt, gs = dcgan.Generator(upsample="transpose", **kw), dcgan.Generator(upsample="subpixel", **kw)
    z = jax.random.normal(jax.random.key(1), (3, 16))
    vt = _init(gt, z)
    params = dict(vt["params"])
    for name in [k for k in params if k.startswith("up")]:
        params[name] = {"conv": {"kernel": dcgan.subpixel_kernel_from_transpose(
            params[name]["conv"]["kernel"])}}
    vs = {"params": params, "batch_stats": vt["batch_stats"]}
    assert jax.tree.map(jnp.shape, vs) == jax.tree.map(jnp.shape, jax.eval_shape(gs.init, RNGS, z))
    np.testing.assert_allclose(_apply(gs)(vs, z), _apply(gt)(vt, z), atol=1e-5)
    out_t, _ = _apply(gt, train=True, mutable=["batch_stats"])(vt, z)
    out_s, _ = _apply(gs, train=True, mutable=["batch_stats"])(vs, z)
    np.testing.assert_allclose(out_s, out_t, atol=1e-5)


def test_bn_axis_name_gives_global_batch_statistics():
    """Under shard_map with bn_axis_name, batch stats equal those of the whole batch on one device."""
    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    kw = dict(resolution=16, width=8, width_max=16, z_dim=16)
    g_one, g_par = dcgan.Generator(**kw), dcgan.Generator(bn_axis_name="data", **kw)
    z = jax.random.normal(jax.random.key(1), (2 * n, 16))
    variables = _init(g_one, z)
    img_one, upd_one = _apply(g_one, train=True, mutable=["batch_stats"])(variables, z)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=(P("data"), P()), check_vma=False)
    def step(v, zs):
        return g_par.apply(v, zs, train=True, mutable=["batch_stats"])

    img_par, upd_par = jax.jit(step)(variables, z)
    np.testing.assert_allclose(img_par, img_one, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), upd_par, upd_one)


def test_student_flops_at_most_one_eighth_of_default_teacher():
    pytest.importorskip("kdjax.models.stylegan2")
    student = build_model("dcgan_generator")  # the default student
    teacher = build_model("stylegan2_generator")  # the default 32x32 teacher
    teacher_res = getattr(teacher, "img_resolution", getattr(teacher, "resolution", None))
    assert student.resolution == teacher_res  # the default pair must match
    s = cost.summary("dcgan_generator", timed=False)
    t = cost.summary("stylegan2_generator", timed=False)
    assert s.flops_per_image > 0 and t.flops_per_image > 0
    assert s.flops_per_image <= t.flops_per_image / 8, (s.flops_per_image, t.flops_per_image)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    g = dcgan.Generator(resolution=16, dtype=jnp.bfloat16)
    d = dcgan.Discriminator(resolution=16, dtype=jnp.bfloat16)
    (img, feats), gv = jax.eval_shape(functools.partial(g.init_with_output, return_features=True),
                                      RNGS, _abstract((2, 128)))
    logits, dv = jax.eval_shape(d.init_with_output, RNGS, _abstract((2, 16, 16, 3)))
    assert img.dtype == logits.dtype == jnp.float32
    assert all(f.dtype == jnp.bfloat16 for f in feats.values())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((gv, dv)))


def test_progressive_stages_have_their_resolution_and_fade_in_continuously():
    """A progressive generator at stage r makes r x r images; at alpha = 0 they are the previous stage's,
    pixel-repeated; in between they are the straight line between the two; the full stage is the plain call."""
    g = dcgan.Generator(resolution=32, img_channels=1, z_dim=16, width=8, width_max=32, progressive=True)
    variables = g.init(jax.random.key(0), jnp.zeros((2, 16)))
    z = jax.random.normal(jax.random.key(1), (3, 16))
    up2 = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    for stage in (8, 16, 32):
        new = g.apply(variables, z, stage=stage, alpha=1.0)
        assert new.shape == (3, stage, stage, 1)
        faded_out = g.apply(variables, z, stage=stage, alpha=0.0)
        previous = g.apply(variables, z, stage=stage // 2) if stage > 8 else None
        if previous is not None:
            np.testing.assert_array_equal(faded_out, up2(previous))
        half = g.apply(variables, z, stage=stage, alpha=0.25)
        np.testing.assert_allclose(half, 0.75 * faded_out + 0.25 * new, atol=1e-6)
        assert not np.allclose(faded_out, new)
    np.testing.assert_array_equal(g.apply(variables, z), g.apply(variables, z, stage=32, alpha=1.0))
    with pytest.raises(ValueError, match="only a progressive generator grows"):
        dcgan.Generator(resolution=32, z_dim=16).apply(variables, z, stage=16)
    with pytest.raises(ValueError, match="only a progressive generator grows"):
        g.apply(variables, z, stage=4)


def test_growth_schedule_by_hand():
    from kdjax.steps.distill import Growth

    growth = Growth.plan(8, 32, 90, fade_fraction=0.5)  # stages 8, 16, 32 on steps [0, 30), [30, 60), [60, 90)
    assert growth.stages == (8, 16, 32) and growth.boundaries == (0, 30, 60, 90)
    assert [growth.stage_index(s) for s in (0, 29, 30, 59, 60, 89, 200)] == [0, 0, 1, 1, 2, 2, 2]
    assert float(growth.alpha(0, 5)) == 1.0
    assert [float(growth.alpha(1, s)) for s in (30, 37.5, 45, 50)] == [0.0, 0.5, 1.0, 1.0]
