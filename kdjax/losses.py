"""Loss terms of every objective in kdjax: each a small pure function with its formula.

All functions take float arrays and return a scalar averaged over the batch (the first axis) unless
said otherwise. Logits are computed in float32 for the softmax, whatever the compute dtype.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

Features = Mapping[str, jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CE(z, y) = mean_b [ -log softmax(z_b)[y_b] ].

    Args:
      logits: (B, C) unnormalised scores.
      labels: (B,) integer class indices.
    Returns:
      The batch-mean cross-entropy in nats.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
    """KL(p_t || p_s) with p = softmax(z / T), batch mean, in nats (no T^2 factor).

    KL = mean_b sum_{c : p_t[b, c] > 0} p_t[b, c] * (log p_t[b, c] - log p_s[b, c]), from log-softmaxes
    (`optax.losses.kl_divergence_with_log_targets`, the same numbers as writing it out). A class the
    teacher masks with a logit of -inf has p_t = 0 and adds 0 (the limit of p log p), as in torch's
    `F.kl_div(log_softmax(z_s), softmax(z_t))`; written out, it would add 0 * (-inf) = NaN. Its log p_t is
    replaced by 0 before the product, so the gradient stays finite for the teacher's logits as well as the
    student's. Callers stop the teacher's gradient.
    """
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    support = log_pt != -jnp.inf  # NaN logits stay NaN (and stop the run), only p_t = 0 is left out
    per_example = optax.losses.kl_divergence_with_log_targets(log_ps, jnp.where(support, log_pt, 0.0),
                                                              where=support)
    return jnp.mean(per_example)


def distillation_kl(teacher_logits: jax.Array, student_logits: jax.Array,
                    temperature: float) -> jax.Array:
    """Hinton et al. (2015) soft-target term: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)).

    The T^2 factor keeps the gradient magnitude of the soft term comparable across temperatures
    (the gradient of the KL scales as 1 / T^2).
    """
    return temperature ** 2 * kl_divergence(teacher_logits, student_logits, temperature)


def classic_kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classic KD: alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).

    alpha = 1 is training from hard labels alone (the teacher is ignored); alpha = 0 is pure
    distillation. The teacher logits are treated as constants.

    Returns:
      (loss, terms) with terms = {"ce": CE, "kl": T^2 * KL} (unweighted), for logging.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    ce = softmax_cross_entropy(student_logits, labels)
    kl = distillation_kl(teacher_logits, student_logits, temperature)
    return alpha * ce + (1.0 - alpha) * kl, {"ce": ce, "kl": kl}


def pairwise_distances(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """(N, N) Euclidean distances between the rows of x (N, D), in float32, with a zero diagonal. Squared
    distances are clamped at `eps` before the square root (as RKD's reference code does), so identical rows
    give distance sqrt(eps) and a zero gradient instead of the square root's infinite one."""
    x = x.astype(jnp.float32)
    d2 = jnp.sum(jnp.square(x[:, None, :] - x[None, :, :]), axis=-1)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, jnp.sqrt(jnp.maximum(d2, eps)))


def relational_distance(student_emb: jax.Array, teacher_emb: jax.Array) -> jax.Array:
    """RKD-D (Park et al. 2019): the student's embeddings keep the teacher's distance structure.

    psi(e)_ij = ||e_i - e_j|| / mu, mu the mean distance over the pairs i != j of the batch;
    loss = mean over pairs i != j of Huber_1(psi(s)_ij - psi(t)_ij) (`optax.losses.huber_loss`, delta 1:
    smooth L1). Scale-free, so embeddings of different sizes compare without an adapter. The teacher's
    side is treated as a constant.
    """
    n = student_emb.shape[0]
    off = ~jnp.eye(n, dtype=bool)

    def psi(e):
        d = pairwise_distances(e)
        return d / jnp.maximum(jnp.sum(d) / (n * (n - 1)), 1e-12)

    target = jax.lax.stop_gradient(psi(teacher_emb))
    return jnp.sum(jnp.where(off, optax.losses.huber_loss(psi(student_emb), target, delta=1.0), 0.0)) / (n * (n - 1))


# --- Autoregressive models: one categorical distribution per pixel and channel.
# Logits are (B, H, W, C, L) over L intensity levels; targets are the integer levels (B, H, W, C).

def bits_per_image(logits: jax.Array, levels: jax.Array) -> jax.Array:
    """NLL of each image in bits per dimension, (B,): -sum_{i,j,c} log2 softmax(z_bijc)[x_bijc] / (H * W * C).

    The exact negative log-likelihood of each image under the model's factorisation."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, levels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return nll.reshape(nll.shape[0], -1).mean(axis=1) / jnp.log(2.0)


def bits_per_dim(logits: jax.Array, levels: jax.Array) -> jax.Array:
    """NLL in bits per dimension: mean_b [ -sum_{i,j,c} log2 softmax(z_bijc)[x_bijc] ] / (H * W * C), the batch
    mean of `bits_per_image`, computed as the model's CE over every pixel and channel (nats) / ln 2."""
    return softmax_cross_entropy(logits.reshape(-1, logits.shape[-1]), levels.reshape(-1)) / jnp.log(2.0)


def pixel_kd(student_logits: jax.Array, teacher_logits: jax.Array, levels: jax.Array,
             alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classic KD at every pixel and channel (word-level KD, Kim & Rush 2016), averaged over them:
    mean_{b,i,j,c} [ alpha * CE(z_s, x) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) ].

    `classic_kd` on the (B * H * W * C, L) flattened logits. Returns (loss, {"ce", "kl"}); "ce" is in nats
    per dimension (bits/dim x ln 2).
    """
    flat = lambda z: z.reshape(-1, z.shape[-1])  # noqa: E731
    return classic_kd(flat(student_logits), flat(teacher_logits), levels.reshape(-1), alpha, temperature)


# --- Vector quantisation (VQ-VAE): the encoder's term; the codebook moves by EMA (`models.vqvae`).

def vq_commitment(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Commitment term (van den Oord et al. 2017): mean over elements of (z_e - sg(z_q))^2, so the encoder's
    outputs stay near the codebook entries they are assigned to; no gradient reaches the codebook."""
    return jnp.mean(jnp.square(z_e.astype(jnp.float32) - jax.lax.stop_gradient(z_q.astype(jnp.float32))))


def code_perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the code usage p_k = n_k / sum n: K when every code is used equally, 1 for one code."""
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


# --- Generator distillation: reconstruction, feature, perceptual, adversarial, R1.
# Images are NHWC; feature dicts map a layer name to a (B, H, W, C) map (or a (B, C) vector).

def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """L1(x, y) = mean |x - y| over all elements (batch, pixels and channels), in float32."""
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2(x: jax.Array, y: jax.Array) -> jax.Array:
    """L2(x, y) = mean (x - y)^2 over all elements (the MSE, not its square root), in float32."""
    return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def feature_matching(student_feats: Mapping[str, jax.Array],
                     teacher_feats: Mapping[str, jax.Array]) -> jax.Array:
    """FM = mean over shared names k of mean (s_k - stop_gradient(t_k))^2 (each map's mean over all elements).

    Args:
      student_feats: name -> student map, already mapped to the teacher's channels by the caller's learned
        1x1 adapters (trained with the student).
      teacher_feats: name -> teacher map; its gradient is stopped here. Names present in only one dict are
        ignored (e.g. resolutions the student lacks).
    Raises:
      ValueError: when no name is shared, or a shared map differs in shape (the message names the keys).
    """
    shared = sorted(set(student_feats) & set(teacher_feats))
    if not shared:
        raise ValueError(f"feature_matching: no shared feature names: student {sorted(student_feats)} vs "
                         f"teacher {sorted(teacher_feats)}.")
    for name in shared:
        if student_feats[name].shape != teacher_feats[name].shape:
            raise ValueError(f"feature_matching: map {name!r} differs in shape: student "
                             f"{student_feats[name].shape} vs teacher {teacher_feats[name].shape}.")
    return jnp.mean(jnp.stack([l2(student_feats[k], jax.lax.stop_gradient(teacher_feats[k]))
                               for k in shared]))


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """n(f) = f / (||f||_2 over the last axis + eps), as LPIPS's `normalize_tensor`, in float32.

    The norm is taken as 0 (with a zero gradient) where a channel vector is all zero, as happens after a
    ReLU, so the function is safe to differentiate; sqrt(sum f^2) there has a NaN gradient.
    """
    f = f.astype(jnp.float32)
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


def as_maps(f: jax.Array) -> jax.Array:
    """(B, C) vectors become (B, 1, 1, C) maps; (B, H, W, C) maps stay."""
    if f.ndim == 2:
        return f[:, None, None, :]
    if f.ndim != 4:
        raise ValueError(f"Features must be (B, C) or (B, H, W, C), got shape {f.shape}.")
    return f


def shared_feature_keys(feats_a: Features, feats_b: Features) -> list[str]:
    """The sorted layer names of two feature dicts, which must have the same non-empty key set."""
    if set(feats_a) != set(feats_b) or not feats_a:
        raise ValueError(f"Feature dicts differ or are empty: {sorted(feats_a)} vs {sorted(feats_b)}.")
    return sorted(feats_a)


def perceptual_distance(feats_a: Features, feats_b: Features) -> jax.Array:
    """Per image, (B,): d(a, b) = mean over layers l of mean_{h, w} || n(a_l)[h, w] - n(b_l)[h, w] ||_2^2.

    The LPIPS "baseline" distance without learned weights, on channel-normalised feature maps (`n` above);
    (B, C) vectors count as 1 x 1 maps. The one definition of the perceptual distance in kdjax: the training
    term `perceptual`, the fidelity metric and the diversity score all use it.

    Args:
      feats_a, feats_b: layer name -> (B, H, W, C) maps (or (B, C) vectors), same keys and shapes.
    """
    per_layer = []
    for name in shared_feature_keys(feats_a, feats_b):
        fa, fb = as_maps(feats_a[name]), as_maps(feats_b[name])
        if fa.shape != fb.shape:
            raise ValueError(f"Layer {name!r}: shapes differ, {fa.shape} vs {fb.shape}.")
        d = jnp.sum((normalize_channels(fa) - normalize_channels(fb)) ** 2, axis=-1)  # (B, H, W)
        per_layer.append(jnp.mean(d, axis=(1, 2)))
    return jnp.mean(jnp.stack(per_layer), axis=0)


def perceptual(feats_a: Features, feats_b: Features) -> jax.Array:
    """P(a, b) = mean_b perceptual_distance(a, b)[b]: the batch mean of `perceptual_distance`.

    Callers stop the teacher side's gradient if it should be constant. Same keys and shapes required
    (ValueError).
    """
    return jnp.mean(perceptual_distance(feats_a, feats_b))


def d_logistic(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Non-saturating logistic discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake)).

    softplus(x) = log(1 + e^x), computed stably (finite for any finite logit). Logits are (B,).
    """
    return (jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32)))
            + jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32))))


def g_nonsaturating(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss (Goodfellow et al. 2014; StyleGAN2): mean softplus(-D(fake))."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def d_hinge(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Hinge discriminator loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return (jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
            + jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32))))


def g_hinge(fake_logits: jax.Array) -> jax.Array:
    """Hinge generator loss: -mean D(fake)."""
    return -jnp.mean(fake_logits.astype(jnp.float32))


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real_images: jax.Array) -> jax.Array:
    """R1 (Mescheder et al. 2018) = mean_b || grad_x D(x_b) ||^2, the squared norm summed over the image.

    The per-image gradients are taken as the gradient of sum_b D(x_b), as StyleGAN2 does; they are the
    per-image gradients when D treats images independently (a minibatch-stddev layer couples them, and
    then this is StyleGAN2's number, not a strict per-image norm).

    The penalty alone: StyleGAN2's lazy regularisation adds gamma / 2 * k * R1 to the discriminator loss
    every k steps (k = 16); the caller applies that weight and that cadence.

    Args:
      d_fn: images (B, H, W, C) -> logits (B,); closes over the discriminator's parameters.
      real_images: the "real" images (teacher images, and/or real data).
    """
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(real_images)
    grads = grads.astype(jnp.float32).reshape(grads.shape[0], -1)
    return jnp.mean(jnp.sum(jnp.square(grads), axis=-1))


# Adversarial objectives by config name: (generator loss, discriminator loss).
ADVERSARIAL: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array, jax.Array], jax.Array]]] = {
    "logistic": (g_nonsaturating, d_logistic),
    "hinge": (g_hinge, d_hinge),
}


# --- Image-to-image (super-resolution, inpainting, enhancement): FAKD. The pixel terms are `l1` (to the
# ground truth and to the teacher's output) and the adapted feature term `feature_matching`, above.

def feature_affinity(f: jax.Array, eps: float = 1e-7) -> jax.Array:
    """The spatial affinity of a feature map (FAKD, He et al. 2020), (B, HW, HW) in float32:

        F = n(f) reshaped to (B, HW, C),   A = F F^T,   A[b, i, j] = <F[b, i], F[b, j]>,

    n the L2 normalisation of each position's channel vector (`normalize_channels`, eps added to the norm as
    the official code does), so A[b, i, j] is the cosine similarity of positions i and j, in [-1, 1], and A
    does not depend on C: a student's map and a teacher's wider one compare without an adapter.

    Args:
      f: (B, H, W, C) feature maps (any compute dtype; the product is taken in float32 at full precision).
    """
    if f.ndim != 4:
        raise ValueError(f"feature_affinity: expected a (B, H, W, C) map, got shape {f.shape}.")
    b, h, w, c = f.shape
    flat = normalize_channels(f, eps).reshape(b, h * w, c)
    return jnp.einsum("bic,bjc->bij", flat, flat, precision=jax.lax.Precision.HIGHEST)


def fakd(student_feats: Features, teacher_feats: Features) -> jax.Array:
    """FAKD (He, Dai, Lu, Jiang & Xia 2020, "FAKD: Feature-Affinity Based Knowledge Distillation for Efficient
    Image Super-Resolution"), the spatial-affinity term:

        FAKD = mean over shared names k of mean_{b, i, j} | A(s_k)[b, i, j] - sg(A(t_k))[b, i, j] |,

    A = `feature_affinity`. The mean over the HW x HW entries is the official code's `nn.L1Loss()`; the
    official code sums the maps' terms where this averages them (its weight is this one's times the number of
    maps).

    Args:
      student_feats, teacher_feats: name -> (B, H, W, C) map; maps of one name must agree in B, H and W (the
        channels may differ). Names present in only one dict are ignored.
    Raises:
      ValueError: when no name is shared, or a shared pair differs in batch or spatial size.
    """
    shared = sorted(set(student_feats) & set(teacher_feats))
    if not shared:
        raise ValueError(f"fakd: no shared feature names: student {sorted(student_feats)} vs teacher "
                         f"{sorted(teacher_feats)}.")
    for name in shared:
        if student_feats[name].shape[:3] != teacher_feats[name].shape[:3]:
            raise ValueError(f"fakd: map {name!r} differs in (B, H, W): student {student_feats[name].shape[:3]} "
                             f"vs teacher {teacher_feats[name].shape[:3]}.")
    return jnp.mean(jnp.stack([
        jnp.mean(jnp.abs(feature_affinity(student_feats[k])
                         - jax.lax.stop_gradient(feature_affinity(teacher_feats[k])))) for k in shared]))


# --- Variational autoencoders: the KL term of a diagonal Gaussian posterior (`kdjax.steps.vae`).

def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) per latent dimension, averaged over every element (batch, positions
    and channels), in nats:

        KL = mean over elements of 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2),   sigma^2 = exp(logvar),

    the closed form of Kingma & Welling (2014, appendix B), each dimension's term averaged rather than summed,
    so its weight beta compares with a reconstruction term averaged over pixels (`l1`, `l2`). The sum over a
    latent of D dimensions is D times this. In float32.
    """
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))


# --- Diffusion: EDM's denoising objective (`kdjax.steps.diffusion` draws sigma and the noise).

def edm_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's loss weight (Karras et al. 2022, Table 1): lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2, s_d =
    sigma_data. It is 1 / c_out(sigma)^2, so lambda ||D - y||^2 = ||F - F_target||^2 with a unit-variance target
    for the preconditioned network F (`kdjax.models.edm`). In float32."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss_per_example(denoised: jax.Array, clean: jax.Array, sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's denoising loss of each example b, (B,):

        L_b = lambda(sigma_b) * mean over pixels and channels of (D(y_b + sigma_b n_b; sigma_b) - y_b)^2,

    lambda = `edm_weight`. The official code sums over pixels where this averages (a constant factor, H W C).

    Args:
      denoised: (B, H, W, C) the denoiser's output D(y + sigma n; sigma).
      clean: (B, H, W, C) the clean images y.
      sigma: (B,) the noise levels.
    """
    err = jnp.square(denoised.astype(jnp.float32) - clean.astype(jnp.float32))
    return edm_weight(sigma, sigma_data) * jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def edm_loss(denoised: jax.Array, clean: jax.Array, sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's training objective over a batch: mean_b L_b (`edm_loss_per_example`). With ln sigma ~ N(P_mean,
    P_std^2) and n ~ N(0, I) drawn by the caller, its expectation is E_{sigma, y, n} lambda(sigma) ||D(y + sigma
    n; sigma) - y||^2 / (H W C), minimised by D(x; sigma) = E[y | x] at every sigma."""
    return jnp.mean(edm_loss_per_example(denoised, clean, sigma, sigma_data))


# --- Diffusion distillation: the consistency-distillation distances (`kdjax.steps.consistency`). Progressive
# distillation's loss is `edm_loss_per_example` with the two-teacher-step target in place of the clean image.

def squared_l2_per_example(a: jax.Array, b: jax.Array) -> jax.Array:
    """The mean squared difference of each example, (B,): ||a_b - b_b||^2 / d over its d = H W C numbers (the
    consistency models' L2 distance, averaged where they sum: a constant factor d). In float32."""
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def pseudo_huber_per_example(a: jax.Array, b: jax.Array, c: float | None = None) -> jax.Array:
    """The pseudo-Huber distance of each example (Song & Dhariwal 2023, iCT), (B,):

        d(a_b, b_b) = sqrt(||a_b - b_b||^2 + c^2) - c,   c = 0.00054 sqrt(d) by default (d = H W C),

    ~ ||a - b||^2 / (2 c) for ||a - b|| << c and ~ ||a - b|| for ||a - b|| >> c: L2 near 0, robust like L1 away.
    In float32."""
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    flat = diff.reshape(diff.shape[0], -1)
    c = 0.00054 * flat.shape[-1] ** 0.5 if c is None else c
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1) + c**2) - c


CONSISTENCY_DISTANCES = {"l2": squared_l2_per_example, "pseudo_huber": pseudo_huber_per_example}


def consistency_loss(student: jax.Array, target: jax.Array, distance: str) -> jax.Array:
    """Consistency distillation's objective over a batch (Song et al. 2023, eq. 7 with lambda = 1):

        mean_b d(f_theta(x_{n+1,b}; sigma_{n+1,b}), f_target(x_hat_{n,b}; sigma_{n,b})),

    d = `CONSISTENCY_DISTANCES[distance]` ("l2" or "pseudo_huber"). The caller stops the gradient of `target`."""
    if distance not in CONSISTENCY_DISTANCES:
        raise ValueError(f"distance={distance!r}; valid: {list(CONSISTENCY_DISTANCES)}.")
    return jnp.mean(CONSISTENCY_DISTANCES[distance](student, target))
