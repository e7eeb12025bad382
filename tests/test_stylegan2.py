"""StyleGAN2 generator/discriminator: shapes at every resolution, parameter counts against the official
architecture's per-layer formulas, rng/noise/truncation/mixing semantics, and the low-level ops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models import build_model
from kdjax.models import stylegan2_layers as L
from kdjax.models.stylegan2 import Discriminator, Generator, mix_styles, sample_crossover

FFHQ = dict(z_dim=512, w_dim=512, img_resolution=1024, channel_base=32768, channel_max=512, mapping_layers=8)
SMALL = dict(z_dim=32, w_dim=32, img_resolution=16, channel_base=256, channel_max=32)


# --- official parameter counts from per-layer formulas (independent of the module code) ----------------

def _fc(i, o, bias=True):
    return i * o + (o if bias else 0)


def _conv(i, o, k, bias=True):
    return o * i * k * k + (o if bias else 0)


def official_g_params(z_dim, w_dim, img_resolution, channel_base, channel_max, c_dim=0, img_channels=3,
                      mapping_layers=8, **_):
    ch = lambda r: min(channel_base // r, channel_max)
    n = _fc(c_dim, w_dim) if c_dim else 0                                   # mapping.embed
    feats = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * mapping_layers
    n += sum(_fc(feats[i], feats[i + 1]) for i in range(mapping_layers))   # mapping.fc{i}
    layer = lambda i, o: _fc(w_dim, i) + _conv(i, o, 3) + 1                 # affine, weight+bias, noise_strength
    torgb = lambda i: _fc(w_dim, i) + _conv(i, img_channels, 1)
    for r in [2 ** k for k in range(2, int(math.log2(img_resolution)) + 1)]:
        if r == 4:
            n += ch(4) * 16 + layer(ch(4), ch(4)) + torgb(ch(4))               # const, conv1, torgb
        else:
            n += layer(ch(r // 2), ch(r)) + layer(ch(r), ch(r)) + torgb(ch(r))  # conv0, conv1, torgb
    return n


def official_d_params(img_resolution, channel_base, channel_max, c_dim=0, img_channels=3, mapping_layers=8,
                      **_):
    ch = lambda r: min(channel_base // r, channel_max)
    n = 0
    for r in [2 ** k for k in range(int(math.log2(img_resolution)), 2, -1)]:
        if r == img_resolution:
            n += _conv(img_channels, ch(r), 1)                                 # fromrgb
        n += _conv(ch(r), ch(r), 3) + _conv(ch(r), ch(r // 2), 3) + _conv(ch(r), ch(r // 2), 1, False)
    cmap = ch(4) if c_dim else 0
    if c_dim:
        n += _fc(c_dim, cmap) + mapping_layers * _fc(cmap, cmap)             # mapping (z_dim=0)
    n += _conv(ch(4) + 1, ch(4), 3) + _fc(ch(4) * 16, ch(4)) + _fc(ch(4), cmap or 1)  # epilogue
    return n


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _g_shapes(g, batch=2):
    labels = jnp.zeros((batch,), jnp.int32) if g.c_dim else None
    return jax.eval_shape(lambda: g.init_with_output(
        {"params": jax.random.key(0), "noise": jax.random.key(1)}, jnp.zeros((batch, g.z_dim)), labels,
        return_features=True))


def _d_shapes(d, batch=4):
    labels = jnp.zeros((batch,), jnp.int32) if d.c_dim else None
    x = jnp.zeros((batch, d.img_resolution, d.img_resolution, d.img_channels))
    return jax.eval_shape(lambda: d.init_with_output(jax.random.key(0), x, labels))


def test_formula_reproduces_official_ffhq_generator_count():
    assert official_g_params(**FFHQ) == 30_370_060


@pytest.mark.parametrize("res", [16, 32, 64, 128, 256, 512, 1024])
def test_shapes_and_param_counts_every_resolution(res):
    cfg = dict(z_dim=64, w_dim=64, img_resolution=res, channel_base=2048, channel_max=64,
               c_dim=(5 if res == 32 else 0), img_channels=(1 if res == 16 else 3))
    g = Generator(**cfg)
    (img, feats), variables = _g_shapes(g)
    assert img.shape == (2, res, res, cfg["img_channels"]) and img.dtype == jnp.float32
    assert sorted(feats) == sorted(f"res{2 ** k}" for k in range(2, int(math.log2(res)) + 1))
    assert all(f.shape[1] == int(k[3:]) for k, f in feats.items())
    assert _count(variables["params"]) == official_g_params(**cfg)
    d = Discriminator(**{k: v for k, v in cfg.items() if k not in ("z_dim", "w_dim")})
    logits, dvars = _d_shapes(d)
    assert logits.shape == (4,)
    assert _count(dvars["params"]) == official_d_params(**cfg)


def test_ffhq_1024_config_f_shapes_and_counts():
    g = Generator(**FFHQ)
    (img, feats), variables = _g_shapes(g, batch=1)
    assert img.shape == (1, 1024, 1024, 3) and feats["res1024"].shape == (1, 1024, 1024, 32)
    assert _count(variables["params"]) == 30_370_060
    assert variables["w_avg"]["mapping_network"]["w_avg"].shape == (512,)
    d = Discriminator(img_resolution=1024, channel_base=32768, channel_max=512)
    logits, dvars = _d_shapes(d)
    assert logits.shape == (4,)
    assert _count(dvars["params"]) == official_d_params(1024, 32768, 512) == 29_012_513


def test_registry_builds_both():
    assert isinstance(build_model("stylegan2_generator", **SMALL), Generator)
    with pytest.raises(ValueError, match="no field"):
        build_model("stylegan2_discriminator", z_dim=3)


# --- semantics on a small generator ------------------------------------------------------------------------

_STATIC = ("method", "noise_mode", "truncation_psi", "truncation_cutoff", "update_w_avg", "mutable",
           "style_mixing_prob", "return_features")


def jit_apply(module):
    """module.apply, compiled (eager op-by-op dispatch is slow on this CPU)."""
    return jax.jit(module.apply, static_argnames=_STATIC)


@pytest.fixture(scope="module")
def small():
    g = Generator(**SMALL)
    v = jax.jit(g.init)({"params": jax.random.key(0)}, jnp.zeros((1, 32)))
    # Give the noise strengths and w_avg non-trivial values (they start at 0).
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 0.5) if p[-1].key == "noise_strength" else x, v["params"])
    w_avg = {"mapping_network": {"w_avg": jax.random.normal(jax.random.key(5), (32,))}}
    z = jax.random.normal(jax.random.key(1), (4, 32))
    return g, dict(v, params=params, w_avg=w_avg), v, z


def test_same_rng_same_image_and_noise_only_through_noise(small):
    g, v, v_init, z = small
    run = jax.jit(lambda v, z, k, mode: g.apply(v, z, noise_mode=mode, rngs={"noise": k}), static_argnums=3)
    k1, k2 = jax.random.key(11), jax.random.key(12)
    a = run(v, z, k1, "random")
    np.testing.assert_array_equal(a, run(v, z, k1, "random"))
    assert float(jnp.abs(a - run(v, z, k2, "random")).max()) > 1e-3          # noise rng matters ...
    np.testing.assert_array_equal(run(v, z, k1, "none"), run(v, z, k2, "none"))  # ... only via noise
    np.testing.assert_array_equal(run(v, z, k1, "const"), run(v, z, k2, "const"))
    assert float(jnp.abs(run(v, z, k1, "const") - run(v, z, k1, "none")).max()) > 1e-3
    # With the initial (zero) noise strengths the image does not depend on the noise rng or mode.
    np.testing.assert_allclose(run(v_init, z, k1, "random"), run(v_init, z, k2, "random"), atol=1e-6)
    np.testing.assert_allclose(run(v_init, z, k1, "random"), run(v_init, z, k1, "none"), atol=1e-6)


def test_psi_zero_is_the_image_of_w_avg(small):
    g, v, _, z = small
    ap = jit_apply(g)
    img = ap(v, z, truncation_psi=0.0, noise_mode="const")
    w_avg = v["w_avg"]["mapping_network"]["w_avg"]
    ws = jnp.broadcast_to(w_avg, (4, g.num_ws, 32))
    np.testing.assert_allclose(img, ap(v, ws, method="synthesis", noise_mode="const"), atol=1e-5)
    ws_cut = ap(v, z, method="mapping", truncation_psi=0.0, truncation_cutoff=3)
    full = ap(v, z, method="mapping")
    np.testing.assert_allclose(ws_cut[:, :3], ws[:, :3], atol=1e-6)
    np.testing.assert_allclose(ws_cut[:, 3:], full[:, 3:], atol=1e-6)


def test_w_avg_update_and_pmean(small):
    g, v, _, z = small
    ap = jit_apply(g)
    _, state = ap(v, z, method="mapping", update_w_avg=True, mutable=("w_avg",))
    old = v["w_avg"]["mapping_network"]["w_avg"]
    mean = ap(v, z, method="mapping")[:, 0].mean(0)
    np.testing.assert_allclose(state["w_avg"]["mapping_network"]["w_avg"], mean + 0.995 * (old - mean),
                               atol=1e-5)
    gp = Generator(**SMALL, axis_name="data")   # two shards of 2: the pmean-ed mean equals the full mean
    shard = lambda zz: gp.apply(v, zz, method="mapping", update_w_avg=True, mutable=("w_avg",))
    _, sharded = jax.jit(jax.vmap(shard, axis_name="data"))(z.reshape(2, 2, 32))
    np.testing.assert_allclose(sharded["w_avg"]["mapping_network"]["w_avg"][0],
                               state["w_avg"]["mapping_network"]["w_avg"], atol=1e-5)


def test_style_mixing_switches_at_crossover(small):
    g, v, _, z = small
    ap = jit_apply(g)
    z2 = jax.random.normal(jax.random.key(2), z.shape)
    ws1, ws2 = ap(v, z, method="mapping"), ap(v, z2, method="mapping")
    mixed = mix_styles(ws1, ws2, 3)
    np.testing.assert_array_equal(mixed[:, :3], ws1[:, :3])
    np.testing.assert_array_equal(mixed[:, 3:], ws2[:, 3:])
    synth = lambda ws: ap(v, ws, method="synthesis", noise_mode="const")
    img = synth(mixed)
    assert float(jnp.abs(img - synth(ws1)).max()) > 1e-3 and float(jnp.abs(img - synth(ws2)).max()) > 1e-3
    per_sample = mix_styles(ws1, ws2, jnp.array([0, 2, 4, g.num_ws]))
    np.testing.assert_array_equal(per_sample[0], ws2[0])
    np.testing.assert_array_equal(per_sample[3], ws1[3])
    cuts = jax.vmap(lambda k: sample_crossover(k, g.num_ws, 1.0))(jax.random.split(jax.random.key(0), 200))
    assert int(cuts.min()) >= 1 and int(cuts.max()) < g.num_ws
    assert int(sample_crossover(jax.random.key(0), g.num_ws, 0.0)) == g.num_ws
    rngs = {"noise": jax.random.key(0), "style_mix": jax.random.key(3)}
    a = ap(v, z, noise_mode="const", style_mixing_prob=1.0, rngs=rngs)
    np.testing.assert_array_equal(a, ap(v, z, noise_mode="const", style_mixing_prob=1.0, rngs=rngs))
    assert float(jnp.abs(a - ap(v, z, noise_mode="const")).max()) > 1e-3


def test_conditional_labels_and_discriminator():
    g = Generator(**SMALL, c_dim=4)
    z = jax.random.normal(jax.random.key(0), (4, 32))
    labels = jnp.array([0, 1, 2, 3])
    ap = jit_apply(g)
    v = jax.jit(g.init)({"params": jax.random.key(0)}, z, labels)
    a = ap(v, z, labels, noise_mode="none")
    np.testing.assert_array_equal(a, ap(v, z, jax.nn.one_hot(labels, 4), noise_mode="none"))
    d = Discriminator(c_dim=4, img_resolution=16, channel_base=256, channel_max=32)
    apd = jit_apply(d)
    dv = jax.jit(d.init)(jax.random.key(1), a, labels)
    logits = apd(dv, a, labels)
    assert logits.shape == (4,) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="divisible"):
        apd(dv, jnp.concatenate([a, a[:2]]), jnp.concatenate([labels, labels[:2]]))


# --- low-level ops against direct reference computations -------------------------------------------------

def _np_upfirdn2d(x, up, down, pad, gain):
    """Direct reference: zero-insert, pad (>= 0), 2-D convolution with the (flipped) 4x4 filter, decimate."""
    b, h, w, c = x.shape
    u = np.zeros((b, h * up, w * up, c), x.dtype)
    u[:, ::up, ::up] = x
    u = np.pad(u, ((0, 0), (pad[2], pad[3]), (pad[0], pad[1]), (0, 0)))
    f = L.filter_2d()[::-1, ::-1] * gain
    oh, ow = u.shape[1] - 3, u.shape[2] - 3
    y = sum(f[i, j] * u[:, i:i + oh, j:j + ow] for i in range(4) for j in range(4))
    return y[:, ::down, ::down]


def test_upfirdn2d_matches_reference():
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    f = L.setup_filter()
    np.testing.assert_allclose(L.upsample2d(jnp.asarray(x), f), _np_upfirdn2d(x, 2, 1, (2, 1, 2, 1), 4),
                               atol=1e-5)
    np.testing.assert_allclose(L.downsample2d(jnp.asarray(x), f), _np_upfirdn2d(x, 1, 2, (1, 1, 1, 1), 1),
                               atol=1e-5)


def test_folded_upconv_and_fused_modconv_match_reference():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    f = L.setup_filter()
    # Official up path: zero-insert, pad (3, 2), FIR with gain 4, then a true convolution with w.
    ref = L._conv(L.upfirdn2d(x, f, up=2, padding=(3, 2, 3, 2), gain=4), w[::-1, ::-1], 1, 0)
    np.testing.assert_allclose(L.conv2d_resample(x, w, f, up=2, padding=1, flip_weight=False), ref, atol=1e-4)
    for up, flip in [(1, True), (2, False)]:
        a = L.modulated_conv2d(x, w, s, up=up, padding=1, flip_weight=flip, fused=False)
        b = L.modulated_conv2d(x, w, s, up=up, padding=1, flip_weight=flip, fused=True)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_minibatch_std_groups_are_strided_like_official():
    x = np.random.default_rng(2).standard_normal((8, 4, 4, 6)).astype(np.float32)
    y = np.asarray(L.minibatch_std(jnp.asarray(x), 4, 1))
    for i in range(8):   # official: x.reshape(G, -1, ...) puts image i in group i % (N // G)
        grp = x[i % 2::2]
        expect = np.sqrt(grp.var(axis=0) + 1e-8).mean()
        np.testing.assert_allclose(y[i, :, :, -1], expect, rtol=1e-5)
    np.testing.assert_array_equal(y[..., :6], x)
