"""The EDM denoiser family: the preconditioning coefficients by hand, the denoiser as c_skip x + c_out F(c_in x;
c_noise) of its own body, shapes at several resolutions without compute, dropout through its rng stream, bad fields
as one clear error, a denoiser bundle saved, checked and loaded, and the DMD2 realism head on maps of any side."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.core.checkpoints import CheckpointError, tree_shapes
from kdjax.evaluation import cost
from kdjax.models import bundles
from kdjax.models.edm import EDMUNet, RealismHead, UNet, preconditioning

SMALL = dict(resolution=8, channels=2, num_classes=3, widths=(8, 16), num_blocks=1, attention_resolutions=(4,),
             dropout=0.3)


def test_preconditioning_against_hand_values():
    """sigma_data = 0.5. sigma = 0.5: sigma^2 + s_d^2 = 0.5, c_skip = 0.25 / 0.5, c_out = 0.25 / sqrt(0.5), c_in =
    1 / sqrt(0.5), c_noise = ln(0.5) / 4. sigma = 2: 4.25, c_skip = 0.25 / 4.25, c_out = c_in = 1 / sqrt(4.25)."""
    c_skip, c_out, c_in, c_noise = preconditioning(jnp.asarray([0.5, 2.0]), 0.5)
    np.testing.assert_allclose(c_skip, [0.5, 0.0588235294], rtol=1e-6)
    np.testing.assert_allclose(c_out, [0.3535533906, 0.4850712501], rtol=1e-6)
    np.testing.assert_allclose(c_in, [1.4142135624, 0.4850712501], rtol=1e-6)
    np.testing.assert_allclose(c_noise, [-0.1732867951, 0.1732867951], rtol=1e-6)
    # The limits: no noise keeps x (c_skip -> 1, c_out -> 0); much noise trusts the network (c_skip -> 0).
    c_skip, c_out, _, _ = preconditioning(jnp.asarray([1e-4, 1e4]), 0.5)
    np.testing.assert_allclose(c_skip, [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(c_out, [1e-4, 0.5], rtol=1e-6)


@pytest.fixture(scope="module")
def small():
    """A conditional 2-level U-Net with attention and dropout, initialised, and the same with every parameter moved
    off its initial value (its zero-initialised layers included), so F is not 0."""
    model = EDMUNet(**SMALL)
    x = jnp.zeros((2, 8, 8, 2))
    variables = jax.jit(lambda k: model.init(k, x, jnp.ones((2,)), jnp.zeros((2,), jnp.int32)))(
        jax.random.key(0, impl="rbg"))
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda v: v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32), variables)
    return model, variables, moved


def test_denoiser_is_the_preconditioned_body(small):
    """D(x; sigma) against c_skip x + c_out F(c_in x; c_noise) with the coefficients computed here in numpy and F
    the U-Net body alone (its submodule "net"); at initialisation (output conv at zero) D = c_skip x exactly; the
    label changes D."""
    model, variables, moved = small
    rng = np.random.default_rng(0)
    sigma = np.array([0.002, 0.3, 2.5, 80.0])
    x = (rng.uniform(-1, 1, (4, 8, 8, 2)) + sigma[:, None, None, None] * rng.standard_normal((4, 8, 8, 2))).astype(
        np.float32)
    labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
    apply = jax.jit(lambda v, x, s, y: model.apply(v, x, s, y))
    net = UNet(2, 3, (8, 16), 1, (4,), 0.3)
    body = jax.jit(lambda v, x, t, y: net.apply({"params": v["params"]["net"]}, x, t, y, False)[0])
    s2 = sigma**2 + 0.25
    c_skip, c_out, c_in, c_noise = 0.25 / s2, sigma * 0.5 / np.sqrt(s2), 1 / np.sqrt(s2), np.log(sigma) / 4
    e = lambda c: c[:, None, None, None]
    f = np.asarray(body(moved, jnp.asarray(e(c_in) * x, jnp.float32), jnp.asarray(c_noise, jnp.float32), labels))
    d = np.asarray(apply(moved, x, sigma, labels))
    assert d.dtype == np.float32 and np.abs(f).mean() > 0.1
    np.testing.assert_allclose(d, e(c_skip) * x + e(c_out) * f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply(variables, x, sigma, labels), e(c_skip) * x, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(apply(moved, x, sigma, labels.at[3].set(0))) - d)[3].max() > 1e-3  # sigma = 80


def test_dropout_draws_from_its_rng_stream(small):
    model, _, moved = small
    x, sigma, labels = jnp.ones((2, 8, 8, 2)), jnp.ones((2,)), jnp.zeros((2,), jnp.int32)
    train = jax.jit(lambda k: model.apply(moved, x, sigma, labels, train=True, rngs={"dropout": k}))
    a, b, c = train(jax.random.key(0)), train(jax.random.key(0)), train(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):
        model.apply(moved, x, sigma, labels, train=True)  # training without the stream is refused


@pytest.mark.parametrize("resolution,widths,attention,classes,blocks", [
    (8, (8, 16), (4,), 0, 2), (16, (8, 16, 16), (16, 4), 10, 1), (32, (8, 8, 16, 16), (8,), 0, 1)])
def test_shapes_at_several_resolutions_without_compute(resolution, widths, attention, classes, blocks):
    model = EDMUNet(resolution=resolution, channels=3, num_classes=classes, widths=widths, num_blocks=blocks,
                    attention_resolutions=attention)
    x = jax.ShapeDtypeStruct((5, resolution, resolution, 3), jnp.float32)
    sigma = jax.ShapeDtypeStruct((5,), jnp.float32)
    labels = jax.ShapeDtypeStruct((5,), jnp.int32) if classes else None
    variables = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), x, sigma, labels)
    out, features = jax.eval_shape(lambda v, *a: model.apply(v, *a, return_features=True), variables, x, sigma, labels)
    assert out.shape == (5, resolution, resolution, 3) and out.dtype == jnp.float32
    levels = len(widths)
    sizes = [resolution // 2**i for i in range(levels)]
    assert features["mid"].shape == (5, sizes[-1], sizes[-1], widths[-1])
    assert {k: v.shape for k, v in features.items() if k != "mid"} == {
        f"dec{r}": (5, r, r, w) for r, w in zip(sizes, widths)}
    names = set(variables["params"]["net"])
    expected_attention = {f"enc{lv}_{i}_attn" for lv in range(levels) for i in range(blocks) if sizes[lv] in attention}
    expected_attention |= {f"dec{lv}_{i}_attn" for lv in range(levels) for i in range(blocks + 1)
                           if sizes[lv] in attention}
    assert {n for n in names if n.endswith("_attn")} == expected_attention | {"mid_attn"}
    assert ("label_embed" in names) == bool(classes)
    if classes:  # the label embedding is the only difference: num_classes x 4 widths[0] parameters
        plain = jax.eval_shape(lambda *a: model.clone(num_classes=0).init(jax.random.key(0), *a), x, sigma)
        assert cost.count_params(variables) - cost.count_params(plain) == classes * 4 * widths[0]
    assert model.spec == models.DenoiserSpec(resolution, 3, classes, 0.5)


@pytest.mark.parametrize("fields,message", [
    (dict(resolution=10, widths=(8, 16, 16)), "resolution=10 must be a positive multiple of 2^(levels - 1) = 4"),
    (dict(attention_resolutions=(3,)),
     "attention_resolutions=(3,): each must be one of the U-Net's resolutions [8, 4]"),
    (dict(widths=(8, 2)), "widths=(8, 2) must be non-empty, each >= 4"),
    (dict(num_blocks=0), "num_blocks=0 must be >= 1"),
    (dict(dropout=1.0), "dropout=1.0 must be in [0, 1)"),
    (dict(sigma_data=0.0), "sigma_data=0.0 must be > 0"),
    (dict(sigma_min=0.0), "sigma_min=0.0 must be > 0"),
    (dict(parameterisation="flow"), "parameterisation='flow'; valid: ['edm', 'consistency']"),
])
def test_bad_fields_raise_one_clear_error(fields, message):
    model = EDMUNet(**{**SMALL, "num_classes": 0, "attention_resolutions": (), **fields})
    with pytest.raises(ValueError, match=re.escape(message)):
        model.check()
    x, sigma = jax.ShapeDtypeStruct((1, 8, 8, 2), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    with pytest.raises(ValueError):
        jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), x, sigma)


def test_inputs_are_checked():
    model = EDMUNet(**SMALL)
    sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
    with pytest.raises(ValueError, match="labels must be given exactly when num_classes > 0"):
        jax.eval_shape(lambda s: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)), s), sigma)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8, 8, 2\), got \(1, 8, 8, 1\)"):
        jax.eval_shape(lambda s: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), s, jnp.zeros((1,), int)), sigma)


def test_a_denoiser_bundle_saves_checks_and_loads(small, tmp_path):
    model, _, moved = small
    kwargs = {k: v for k, v in SMALL.items()}
    bundles.save_model_bundle(tmp_path / "d", "edm_unet", kwargs, moved)
    assert bundles.check_model_bundle(tmp_path / "d", "teacher", kind="denoiser")["model"] == "edm_unet"
    assert "edm_unet" in models.names_of_kind("denoiser") and models.kind("edm_unet") == "denoiser"
    with pytest.raises(CheckpointError, match=r"holds a 'edm_unet' \(denoiser\); a generator bundle is needed"):
        bundles.check_model_bundle(tmp_path / "d", "teacher", kind="generator")
    loaded, variables, _ = bundles.load_model(tmp_path / "d")
    assert tree_shapes(variables) == tree_shapes(moved)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(moved), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.clone(widths=tuple(loaded.widths), attention_resolutions=tuple(loaded.attention_resolutions)) == model
    meta = json.loads((tmp_path / "d" / "model.json").read_text())
    meta["kwargs"]["widths"] = [8, 32]  # variables of another network
    (tmp_path / "d" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the 'edm_unet' that model.json describes"):
        bundles.check_model_bundle(tmp_path / "d", "teacher")


def test_cost_inputs_are_one_network_evaluation():
    model = EDMUNet(**SMALL)
    args, kwargs = cost.example_inputs("edm_unet", model, 4)
    assert [a.shape for a in args] == [(4, 8, 8, 2), (4,), (4,)] and kwargs == {"train": False}
    assert float(args[1][0]) == 1.0 and args[2].dtype == jnp.int32


@pytest.mark.parametrize("side", [8, 5, 2, 1])
def test_realism_head_reads_a_middle_map_of_any_side_into_one_logit_per_image(side):
    """DMD2's realism head on maps of side r: one logit per image whatever r is (its second conv covers the
    ceil(r/2) map the first leaves), each image's logit its own (changing image 0 leaves image 1's)."""
    head = RealismHead()
    h = jax.random.normal(jax.random.key(0), (3, side, side, 16))
    params = head.init(jax.random.key(1), h)
    assert params["params"]["pool"]["kernel"].shape[:2] == (-(-side // 2),) * 2
    logits = head.apply(params, h)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    moved = head.apply(params, h.at[0].add(1.0))
    assert moved[0] != logits[0] and moved[1] == logits[1]
