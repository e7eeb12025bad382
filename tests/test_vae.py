"""The VAE and its TAESD-style tiny halves: the KL term against a hand computation and Monte Carlo, the
reparameterisation's statistics, shapes at several sizes and factors (no compute), the tiny halves against the
official TAESD layout written in PyTorch, the VAE step's global eps draws and its objective by hand, and bad
inputs as one clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import torch

from kdjax import losses, models
from kdjax.core import parallel
from kdjax.models.tiny_autoencoder import soft_clamp
from kdjax.steps.shell import DRAW_SALT
from kdjax.steps.state import TrainState
from kdjax.steps.vae import eps_draw, make_vae_step

RNGS = {"params": jax.random.key(0, impl="rbg")}  # 'rbg': XLA:CPU compiles threefry initialisers slowly
TINY_VAE = dict(channels=1, latent_channels=2, widths=(8, 8, 16), res_blocks=0, norm_groups=4)  # factor 4


def random_variables(model, *shapes, seed=0, scale=0.1):
    """Variables of `model` for inputs of `shapes`, drawn here from N(0, scale^2) (no init compiled)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, RNGS, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), abstract)


# ----------------------------------------------------------------------------------------- the KL term
def test_gaussian_kl_by_hand_and_by_monte_carlo():
    # 1-d by hand, in the textbook arrangement: KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1 / 2.
    mu, s = 0.5, 0.5
    by_hand = -np.log(s) + (s**2 + mu**2) / 2 - 0.5  # = 0.4431...
    got = losses.gaussian_kl(jnp.array([mu]), jnp.log(jnp.array([s**2])))
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    # Monte Carlo, E_q[log q(z) - log p(z)], for each element of a (2, 3) latent; the term is their mean.
    rng = np.random.default_rng(0)
    means, logvars = rng.normal(size=(2, 3)), rng.uniform(-2.0, 1.0, size=(2, 3))
    per_element = []
    for m, lv in zip(means.ravel(), logvars.ravel(), strict=True):
        sd = np.exp(lv / 2)
        z = rng.normal(m, sd, size=400_000)
        per_element.append(np.mean(scipy.stats.norm.logpdf(z, m, sd) - scipy.stats.norm.logpdf(z)))
    got = float(losses.gaussian_kl(jnp.asarray(means, jnp.float32), jnp.asarray(logvars, jnp.float32)))
    np.testing.assert_allclose(got, np.mean(per_element), rtol=0.02)
    assert float(losses.gaussian_kl(jnp.zeros((4, 2, 2, 3)), jnp.zeros((4, 2, 2, 3)))) == 0.0  # the prior itself
    # Its gradient: d/dmu = mu / N, d/dlogvar = (exp(logvar) - 1) / (2 N) over the N elements.
    g_mu, g_lv = jax.grad(losses.gaussian_kl, argnums=(0, 1))(jnp.asarray(means), jnp.asarray(logvars))
    np.testing.assert_allclose(g_mu, means / 6, rtol=1e-5)
    np.testing.assert_allclose(g_lv, (np.exp(logvars) - 1) / 12, rtol=1e-5)


# ----------------------------------------------------------------------------------------- the VAE
def test_reparameterisation_draws_n_mean_var_and_evaluation_uses_the_mean():
    model = models.build_model("vae", **TINY_VAE)
    variables = random_variables(model, (1, 8, 8, 1), scale=0.3)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 1)), jnp.float32)
    n = 4000
    fn = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"latent": k}))
    out = fn(variables, jnp.repeat(x, n, axis=0), jax.random.key(3, impl="rbg"))
    mean, sd = np.asarray(out["mean"][0]), np.exp(np.asarray(out["logvar"][0]) / 2)
    assert np.ptp(sd) > 0.05  # the posterior's variance differs between latent elements
    z = np.asarray(out["z"], np.float64)
    # Sample mean within 5 standard errors, sample std within 5 % of exp(logvar / 2), element by element.
    assert np.all(np.abs(z.mean(0) - mean) < 5 * sd / np.sqrt(n))
    np.testing.assert_allclose(z.std(0), sd, rtol=0.05)
    again = fn(variables, jnp.repeat(x, n, axis=0), jax.random.key(3, impl="rbg"))["z"]
    np.testing.assert_array_equal(again, out["z"])
    evaluation = model.apply(variables, x)
    np.testing.assert_array_equal(evaluation["z"], evaluation["mean"])
    eps = jnp.full(evaluation["mean"].shape, 0.7)
    given = model.apply(variables, x, train=True, eps=eps)["z"]
    np.testing.assert_allclose(given, evaluation["mean"] + np.exp(evaluation["logvar"] / 2) * 0.7, rtol=1e-6)


@pytest.mark.parametrize("widths,size", [((8,), (5, 7)), ((8, 16), (6, 10)), ((8, 8, 16), (16, 12)),
                                         ((8, 8, 8, 16), (32, 24))])
def test_shapes_for_several_factors_and_sizes(widths, size):
    factor = 2 ** (len(widths) - 1)
    h, w = size
    vae = models.build_model("vae", channels=3, latent_channels=4, widths=widths, norm_groups=4)
    assert vae.spec == models.LatentAutoencoderSpec(3, 4, factor)
    out, _ = jax.eval_shape(vae.init_with_output, RNGS, jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
    assert out["reconstruction"].shape == (2, h, w, 3) and out["reconstruction"].dtype == jnp.float32
    assert out["mean"].shape == out["logvar"].shape == out["z"].shape == (2, h // factor, w // factor, 4)
    for name, inp, want in (("tiny_decoder", (2, h // factor, w // factor, 4), (2, h, w, 3)),
                            ("tiny_encoder", (2, h, w, 3), (2, h // factor, w // factor, 4))):
        tiny = models.build_model(name, channels=3, latent_channels=4, factor=factor, features=8, blocks=1)
        assert tiny.spec == vae.spec
        got, _ = jax.eval_shape(tiny.init_with_output, RNGS, jax.ShapeDtypeStruct(inp, jnp.float32))
        assert got.shape == want


def test_default_tiny_halves_have_taesds_parameter_counts():
    """At TAESD's widths (64, 3 blocks a stage, factor 8, RGB, 4 latent channels) the parameters are the official
    decoder's and encoder's: conv(k, cin, cout) = k^2 cin cout + cout, a Block = 3 conv(3, 64, 64), the
    resampling convs without bias; 10 Blocks in each half."""
    conv = lambda k, cin, cout, bias=True: k * k * cin * cout + (cout if bias else 0)
    blocks = 10 * 3 * conv(3, 64, 64)
    decoder = conv(3, 4, 64) + blocks + 3 * conv(3, 64, 64, bias=False) + conv(3, 64, 3)
    encoder = conv(3, 3, 64) + blocks + 3 * conv(3, 64, 64, bias=False) + conv(3, 64, 4)
    count = lambda name, shape: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        models.build_model(name).init, RNGS, jax.ShapeDtypeStruct(shape, jnp.float32))))
    assert (count("tiny_decoder", (1, 2, 2, 4)), count("tiny_encoder", (1, 16, 16, 3))) == (decoder, encoder)
    assert (decoder, encoder) == (1_222_531, 1_222_532)


# ----------------------------------------------------------------------------------------- TAESD in PyTorch
def torch_conv(cin, cout, stride=1, bias=True):
    return torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class TorchBlock(torch.nn.Module):
    """The official layout (madebyollin/taesd, taesd.py), written out for the comparison."""

    def __init__(self, n):
        super().__init__()
        self.conv = torch.nn.Sequential(torch_conv(n, n), torch.nn.ReLU(), torch_conv(n, n), torch.nn.ReLU(),
                                        torch_conv(n, n))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def load_into(flax_params, torch_modules):
    """Copies the Flax convs (in module order) into the torch convs: kernel (kh, kw, in, out) -> (out, in, kh, kw)."""
    convs = [m for m in torch_modules if isinstance(m, torch.nn.Conv2d)]
    flat = [p for p in jax.tree_util.tree_flatten_with_path(flax_params)[0]]
    kernels = [(path, v) for path, v in flat if path[-1].key == "kernel"]
    assert len(kernels) == len(convs)
    with torch.no_grad():
        for (path, kernel), conv in zip(kernels, convs, strict=True):
            conv.weight.copy_(torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()))
            parent = path[:-1]
            bias = [v for p, v in flat if p[:-1] == parent and p[-1].key == "bias"]
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.asarray(bias[0]).copy()))
            else:
                assert not bias


def flax_order(params, names):
    """The params as a tree whose leaves flatten in the order of `names` (Flax sorts its dict keys)."""
    return [params[n] for n in names]


def test_tiny_halves_match_the_official_taesd_layout_in_pytorch():
    n, stages, lat = 8, 2, 3  # width, factor 4, latent channels; one Block per stage
    rng = np.random.default_rng(0)
    decoder = models.build_model("tiny_decoder", channels=3, latent_channels=lat, factor=4, features=n, blocks=1)
    d_vars = random_variables(decoder, (1, 2, 2, lat), scale=0.2)
    names = ["conv_in", "stage0_block0", "up0", "stage1_block0", "up1", "block_out", "conv_out"]
    t_dec = torch.nn.Sequential(
        torch_conv(lat, n), torch.nn.ReLU(),
        *[m for _ in range(stages) for m in (TorchBlock(n), torch.nn.Upsample(scale_factor=2),
                                             torch_conv(n, n, bias=False))],
        TorchBlock(n), torch_conv(n, 3))
    load_into(flax_order(d_vars["params"], names), t_dec.modules())
    z = rng.normal(0, 2.0, (2, 3, 5, lat)).astype(np.float32)  # beyond the clamp's linear range
    want = t_dec(torch.tanh(torch.from_numpy(z).permute(0, 3, 1, 2) / 3) * 3).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(decoder.apply(d_vars, jnp.asarray(z)), want, rtol=1e-4, atol=1e-4)

    encoder = models.build_model("tiny_encoder", channels=3, latent_channels=lat, factor=4, features=n, blocks=1)
    e_vars = random_variables(encoder, (1, 4, 4, 3), scale=0.2)
    names = ["conv_in", "block_in", "down0", "stage0_block0", "down1", "stage1_block0", "conv_out"]
    t_enc = torch.nn.Sequential(
        torch_conv(3, n), TorchBlock(n),
        *[m for _ in range(stages) for m in (torch_conv(n, n, stride=2, bias=False), TorchBlock(n))],
        torch_conv(n, lat))
    load_into(flax_order(e_vars["params"], names), t_enc.modules())
    x = rng.uniform(-1, 1, (2, 12, 8, 3)).astype(np.float32)
    want = t_enc(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(encoder.apply(e_vars, jnp.asarray(x)), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(soft_clamp(jnp.array([0.01, 100.0])), [0.01, 3.0], rtol=1e-4)


# ----------------------------------------------------------------------------------------- the VAE step
def test_vae_step_draws_eps_for_the_global_batch_and_logs_its_objective():
    """One SGD step on 8 devices, batch 16: the logged terms are L1 and the KL recomputed outside the step with
    eps ~ N(0, I) drawn for the whole global batch from fold_in(fold_in(key, 0), DRAW_SALT), and the loss is
    L1 + beta * KL (per-device draws would give other numbers). That the gradient is that of the global mean
    (8 devices = 1) is tested on the distillation step, which shares the step shell (tests/test_vae_kd.py)."""
    model = models.build_model("vae", **TINY_VAE)
    variables = random_variables(model, (1, 8, 8, 1), scale=0.2)
    batch = {"image": np.random.default_rng(2).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
    key, beta, tx = jax.random.key(7), 0.3, optax.sgd(0.5)
    mesh = parallel.make_mesh()
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    state, metrics = make_vae_step(model, tx, mesh, beta, "l1", key, (2, 2, 2))(
        state, parallel.global_batch(batch, mesh))
    metrics = metrics.compute()
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(parallel.to_host(state.params)),
                                                         jax.tree.leaves(variables["params"]), strict=True))

    eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), DRAW_SALT), (16, 2, 2, 2))
    np.testing.assert_array_equal(eps_draw(key, (2, 2, 2))(jnp.int32(0), 16)[0], eps)
    forward = jax.jit(lambda v, x, e: model.apply(v, x, train=True, eps=e))
    out = jax.tree.map(np.asarray, forward(variables, batch["image"], eps))
    mean, logvar = out["mean"].astype(np.float64), out["logvar"].astype(np.float64)
    np.testing.assert_allclose(out["z"], mean + np.exp(logvar / 2) * np.asarray(eps), rtol=1e-5, atol=1e-6)
    l1 = np.abs(out["reconstruction"] - batch["image"]).mean()
    kl = np.mean(-logvar / 2 + (np.exp(logvar) + mean**2) / 2 - 0.5)
    np.testing.assert_allclose(metrics["reconstruction"], l1, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], l1 + beta * kl, rtol=1e-5)


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name,kwargs,shape,message", [
    ("vae", TINY_VAE, (1, 10, 8, 1), r"x must be \(B, H, W, 1\) with H and W multiples of 4, got \(1, 10, 8, 1\)"),
    ("vae", dict(TINY_VAE, norm_groups=3), (1, 8, 8, 1), r"norm_groups=3 must be 0 or divide every width"),
    ("vae", dict(TINY_VAE, widths=()), (1, 8, 8, 1), r"VAE needs widths \(one per level\)"),
    ("tiny_decoder", dict(latent_channels=4, factor=4), (1, 2, 2, 3), r"z must be \(B, h, w, 4\), got \(1, 2, 2, 3\)"),
    ("tiny_decoder", dict(factor=6), (1, 2, 2, 4), r"factor=6 must be a power of two >= 1"),
    ("tiny_encoder", dict(factor=4), (1, 8, 6, 3), r"x must be \(B, H, W, 3\) with H and W multiples of 4"),
])
def test_bad_inputs_raise_one_clear_error(name, kwargs, shape, message):
    model = models.build_model(name, **kwargs)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, RNGS, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_a_quantised_latent_is_the_nearest_code_and_its_step_moves_the_codebook_by_ema():
    """num_codes = 8: `encode` gives each latent vector's nearest codebook entry (numpy's argmin of squared
    distances to the encoder's z_e), `snap` quantises any latent (and is the identity for a KL VAE), training's
    reconstruction passes z_q straight through; one step of `kdjax.steps.vqvae` with this model (L1 reconstruction)
    moves the codebook by EMA and reports the loss as L1 + beta * commitment."""
    from kdjax.steps.vqvae import make_train_step

    model = models.build_model("vae", channels=1, latent_channels=3, widths=(8, 8), res_blocks=0, norm_groups=0,
                               num_codes=8)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params", "vq"} and variables["vq"]["codebook"].shape == (8, 3)
    out = model.apply(variables, x)
    z_e, codebook = np.asarray(out["z_e"], np.float64), np.asarray(variables["vq"]["codebook"], np.float64)
    nearest = np.argmin(((z_e[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(out["codes"], nearest)
    np.testing.assert_allclose(out["z_q"], codebook[nearest], rtol=1e-6)
    mean, logvar = model.apply(variables, x, method=type(model).encode)
    np.testing.assert_allclose(mean, codebook[nearest], rtol=1e-6)
    assert float(logvar.max()) == -30.0  # a point mass: the log-variance's floor
    np.testing.assert_allclose(model.apply(variables, out["z_e"], method=type(model).snap), out["z_q"], rtol=1e-6)
    kl_vae = models.build_model("vae", channels=1, latent_channels=3, widths=(8, 8), res_blocks=0, norm_groups=0)
    kl_vars = kl_vae.init(jax.random.key(0), x)
    np.testing.assert_array_equal(kl_vae.apply(kl_vars, out["z_e"], method=type(kl_vae).snap), out["z_e"])

    mesh = parallel.make_mesh(jax.devices()[:1])
    tx = optax.sgd(0.01)
    state = TrainState.create(jax.tree.map(jnp.copy, variables), tx)  # init returns the codebook twice (EMA sums)
    step = make_train_step(model, tx, mesh, beta=0.25, decay=0.9, reconstruction=losses.l1)
    new_state, metrics = step(state, {"image": x})
    m = jax.tree.map(float, metrics.compute())
    train_out = model.apply(variables, x, train=True)
    l1 = float(jnp.mean(jnp.abs(train_out["reconstruction"] - x)))
    commitment = float(jnp.mean((out["z_e"] - out["z_q"]) ** 2))
    np.testing.assert_allclose(m["loss"], l1 + 0.25 * commitment, rtol=1e-5)
    np.testing.assert_allclose(train_out["reconstruction"], model.apply(variables, out["z_q"],  # z_e + (z_q - z_e)
                                                                        method=type(model).decode), atol=1e-6)
    assert not np.allclose(new_state.model_state["vq"]["codebook"], variables["vq"]["codebook"])
