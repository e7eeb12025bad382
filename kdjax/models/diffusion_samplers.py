"""Deterministic samplers of a diffusion denoiser: noise levels, EDM's Euler and Heun, DDIM; each counts its
network evaluations (NFE).

A denoiser here is any function `denoise(x, sigma) -> D(x; sigma)` over a batch: x (B, H, W, C), sigma (B,);
a network (`lambda x, s: model.apply(variables, x, s, labels)`, `kdjax.models.edm`) or the exact denoiser of a
Gaussian mixture (`kdjax.models.gaussian_mixture`). Images are made by integrating the probability-flow ODE of
the variance-exploding process x = y + sigma n (Karras et al. 2022, EDM, with sigma(t) = t and s(t) = 1),

    dx / dsigma = (x - D(x; sigma)) / sigma,

from x_0 = sigma_0 n, n ~ N(0, I), down a decreasing grid of noise levels sigma_0 > sigma_1 > ... > sigma_N = 0:

- `euler`: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i, d_i = (x_i - D(x_i; sigma_i)) / sigma_i. N evaluations;
  the step to sigma = 0 returns D(x; sigma_{N-1}).
- `heun` (EDM's Algorithm 1, deterministic): the Euler step, then the trapezoidal correction x_{i+1} = x_i +
  (sigma_{i+1} - sigma_i) (d_i + d'_{i+1}) / 2 with d'_{i+1} = (x'_{i+1} - D(x'_{i+1}; sigma_{i+1})) / sigma_{i+1}
  at the Euler point x'_{i+1}; the last step (to sigma = 0, where d' is undefined) is Euler alone. 2N - 1
  evaluations.
- `ddim` (Song, Meng & Ermon 2021, eta = 0), written in its own variance-preserving form: with alpha_i = 1 / (1 +
  sigma_i^2) (so sigma_i^2 = (1 - alpha_i) / alpha_i), the state z_i = sqrt(alpha_i) x_i, the predictions
  y_i = D(z_i / sqrt(alpha_i); sigma_i) and eps_i = (z_i - sqrt(alpha_i) y_i) / sqrt(1 - alpha_i), and
  z_{i+1} = sqrt(alpha_{i+1}) y_i + sqrt(1 - alpha_{i+1}) eps_i. N evaluations. Divided by sqrt(alpha_{i+1})
  this is x_{i+1} = y_i + sigma_{i+1} (x_i - y_i) / sigma_i = x_i + (sigma_{i+1} - sigma_i) (x_i - y_i) / sigma_i:
  **on the same noise levels DDIM is exactly the Euler step** (EDM, section 3), and they differ only in rounding
  (tested) and in the levels each is used with: `edm_sigmas` (Karras's rho = 7 schedule) for Euler and Heun,
  `ddpm_sigmas` (DDPM's linear-beta schedule at evenly spaced timesteps) for DDIM.

Every sampler is pure and jit-friendly (`lax.fori_loop`) and returns `(images, nfe)` with nfe the evaluations of
`denoise` it made, counted as it makes them (an int32 scalar; `nfe(method, N)` gives it without running). N is the
grid's length minus 1, or `num_steps` (an int or a traced int32) for a grid padded past its end, so that one
compilation serves every step count (`padded`). `sample` draws x_0 from an explicit key.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, H, W, C), sigma (B,)) -> D(x; sigma)


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
    """EDM's noise levels (Karras et al. 2022, eq. 5): N = num_steps levels then 0, (N + 1,) float32,

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N;  sigma_N = 0.

    num_steps = 1 gives (sigma_max, 0): one step from pure noise to the denoiser's answer."""
    check_num_steps(num_steps)
    ramp = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return jnp.asarray(np.append(sigmas, 0.0), jnp.float32)


def ddpm_sigmas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02, train_steps: int = 1000
                ) -> jax.Array:
    """DDIM's noise levels: DDPM's linear beta schedule (Ho et al. 2020: beta_t from beta_start to beta_end over
    `train_steps` timesteps, alpha_t = prod_{u <= t} (1 - beta_u)) seen as sigma_t = sqrt((1 - alpha_t) / alpha_t),
    at N = num_steps timesteps evenly spaced from the last (train_steps - 1) to the first (0), rounded, then 0:
    (N + 1,) float32. With the defaults sigma runs from 157.4 down to 0.01."""
    check_num_steps(num_steps)
    alphas = np.cumprod(1.0 - np.linspace(beta_start, beta_end, train_steps, dtype=np.float64))
    timesteps = np.round(np.linspace(train_steps - 1, 0, num_steps)).astype(int)
    return jnp.asarray(np.append(np.sqrt((1 - alphas[timesteps]) / alphas[timesteps]), 0.0), jnp.float32)


def check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be an integer >= 1.")


def _full(x: jax.Array, sigma: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), sigma, jnp.float32)


def euler_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x + (sigma_next - sigma) (x - D(x; sigma)) / sigma: one evaluation."""
    return x + (sigma_next - sigma) * (x - denoise(x, _full(x, sigma))) / sigma


def steps_of(sigmas: jax.Array, num_steps: int | jax.Array | None) -> int | jax.Array:
    """N: `num_steps`, or all of the grid (its length minus 1)."""
    return sigmas.shape[0] - 1 if num_steps is None else num_steps


def padded(sigmas: jax.Array, length: int) -> jax.Array:
    """The grid followed by zeros up to `length` levels (use with `num_steps` = its own N)."""
    if sigmas.shape[0] > length:
        raise ValueError(f"a grid of {sigmas.shape[0]} levels does not fit in {length}.")
    return jnp.concatenate([sigmas, jnp.zeros((length - sigmas.shape[0],), sigmas.dtype)])


def euler(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, num_steps: int | jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Euler's method down `sigmas` (module docstring) from x at sigmas[0]; returns (x at sigmas[N], nfe = N)."""
    def body(i, carry):
        x, nfe = carry
        return euler_step(denoise, x, sigmas[i], sigmas[i + 1]), nfe + 1

    return jax.lax.fori_loop(0, steps_of(sigmas, num_steps), body, (x, jnp.zeros((), jnp.int32)))


def heun(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, num_steps: int | jax.Array | None = None
         ) -> tuple[jax.Array, jax.Array]:
    """Heun's method down `sigmas`, Euler on the last step (EDM Algorithm 1, module docstring); returns (x at
    sigmas[N], nfe = 2 N - 1)."""
    def body(i, carry):
        x, nfe = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, _full(x, sigma))) / sigma
        x_euler = x + (sigma_next - sigma) * d
        d_next = (x_euler - denoise(x_euler, _full(x, sigma_next))) / sigma_next
        return x + (sigma_next - sigma) * 0.5 * (d + d_next), nfe + 2

    last = steps_of(sigmas, num_steps) - 1
    x, nfe = jax.lax.fori_loop(0, last, body, (x, jnp.zeros((), jnp.int32)))
    return euler_step(denoise, x, sigmas[last], sigmas[last + 1]), nfe + 1


def ddim(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, num_steps: int | jax.Array | None = None
         ) -> tuple[jax.Array, jax.Array]:
    """DDIM (eta = 0) down `sigmas` in its variance-preserving form (module docstring); returns (x at sigmas[N]
    in the variance-exploding scale of the data, nfe = N)."""
    sqrt_alpha = lambda s: jax.lax.rsqrt(1.0 + s**2)  # sqrt(alpha), alpha = 1 / (1 + sigma^2)
    sqrt_one_minus = lambda s: s * jax.lax.rsqrt(1.0 + s**2)  # sqrt(1 - alpha)

    def body(i, carry):
        z, nfe = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        y = denoise(z / sqrt_alpha(sigma), _full(z, sigma))
        eps = (z - sqrt_alpha(sigma) * y) / sqrt_one_minus(sigma)
        return sqrt_alpha(sigma_next) * y + sqrt_one_minus(sigma_next) * eps, nfe + 1

    n = steps_of(sigmas, num_steps)
    z, nfe = jax.lax.fori_loop(0, n, body, (sqrt_alpha(sigmas[0]) * x, jnp.zeros((), jnp.int32)))
    return z / sqrt_alpha(sigmas[n]), nfe


SAMPLERS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {"heun": heun, "euler": euler, "ddim": ddim}


def nfe(method: str, num_steps: int) -> int:
    """The denoiser evaluations of `method` over `num_steps` steps: 2 N - 1 for Heun, N otherwise."""
    check_method(method)
    return 2 * num_steps - 1 if method == "heun" else num_steps


def check_method(method: str) -> None:
    if method not in SAMPLERS:
        raise ValueError(f"sampler {method!r}; valid: {list(SAMPLERS)}.")


def noise_levels(method: str, num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> jax.Array:
    """The grid each method is used with: `edm_sigmas` for Heun and Euler, `ddpm_sigmas` for DDIM."""
    check_method(method)
    return ddpm_sigmas(num_steps) if method == "ddim" else edm_sigmas(num_steps, sigma_min, sigma_max, rho)


def sample(denoise: Denoiser, key: jax.Array, shape: tuple[int, ...], method: str, sigmas: jax.Array,
           num_steps: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Images of `shape` (B, H, W, C) from x_0 = sigmas[0] n, n ~ N(0, I) drawn from `key`, by `method` ("heun",
    "euler" or "ddim") down `sigmas` (its first `num_steps` steps); returns (images, nfe)."""
    check_method(method)
    x = sigmas[0] * jax.random.normal(key, shape, jnp.float32)
    return SAMPLERS[method](denoise, x, sigmas, num_steps)


# --- Consistency models (Song, Dhariwal, Chen & Sutskever 2023): sampling with a consistency function.

Consistency = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, H, W, C), sigma (B,)) -> f(x; sigma)


def consistency_sample(f: Consistency, key: jax.Array, shape: tuple[int, ...], sigmas: jax.Array,
                       sigma_min: float = 0.002) -> tuple[jax.Array, jax.Array]:
    """Multistep consistency sampling (the CM paper's Algorithm 1) with the consistency function `f`:

        x = sigmas[0] n_0,  y = f(x; sigmas[0]);   for tau in sigmas[1:]:  x = y + sqrt(tau^2 - sigma_min^2) n_k,
        y = f(x; tau),

    n_k ~ N(0, I) drawn from fold_in(key, k). `sigmas` (T,) decreasing, sigmas[0] = sigma_max: T = 1 is one-step
    sampling. Returns (images y of `shape`, nfe = T)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x = sigmas[0] * jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    y = f(x, _full(x, sigmas[0]))

    def body(k, carry):
        y, nfe = carry
        tau = sigmas[k]
        x = y + jnp.sqrt(jnp.maximum(tau**2 - sigma_min**2, 0.0)) * jax.random.normal(
            jax.random.fold_in(key, k), shape, jnp.float32)
        return f(x, _full(x, tau)), nfe + 1

    return jax.lax.fori_loop(1, sigmas.shape[0], body, (y, jnp.ones((), jnp.int32)))
