"""NVlabs/edm's denoisers (Karras, Aittala, Aila & Laine 2022, github.com/NVlabs/edm `training/networks.py`): EDM's
preconditioning around the official SongUNet (DDPM++, NCSN++) or DhariwalUNet (ADM), ported to Flax so that an
official network pickle imports one to one (`kdjax.importers.edm`, `python -m kdjax.edm_import`):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), class_labels),

with c_skip, c_out, c_in and c_noise = ln(sigma) / 4 as `kdjax.models.edm.preconditioning` (official `EDMPrecond`),
or the consistency model's (`parameterisation="consistency"`, `edm.consistency_preconditioning`). Labels are ints,
made one-hot inside (the official network takes one-hot `class_labels`).

F is the submodule "model" (official `EDMPrecond.model`), and its parameters carry the official names:
`model.enc.32x32_block0.conv0.weight` is params["model"]["enc"]["32x32_block0"]["conv0"]["weight"] (HWIO here,
OIHW there; `kdjax.models.edm_official_layers`). The fields are the official constructor arguments under the same
names (`img_resolution` -> resolution, `img_channels` -> channels, `label_dim` -> num_classes), with the official
defaults, so a field a pickle does not record takes the official default. Two registry names, because the two
networks take different options: `edm_songunet` (`EDMSongUNet`) and `edm_dhariwalunet` (`EDMDhariwalUNet`).

F, for channel widths m_l = model_channels channel_mult[l] at resolution R / 2^l:
- mapping: an embedding of c_noise (SongUNet: positional with endpoint, [sin, cos], or Fourier, over
  model_channels channel_mult_noise channels; DhariwalUNet: positional, [cos, sin], over model_channels) -> the
  embedding emb of model_channels channel_mult_emb channels through two Linear layers with SiLU; the label enters
  as Linear(one_hot sqrt(label_dim)) added before them (SongUNet) or Linear(one_hot) (no bias) after them
  (DhariwalUNet); augmentation labels (B, augment_dim), when given, through Linear (no bias) before them;
- encoder "enc": a 3x3 conv (to model_channels for SongUNet, m_0 for DhariwalUNet), then per level a down-sampling
  `UNetBlock` (below the top), `num_blocks` blocks to m_l, attention at `attn_resolutions`; SongUNet's encoder_type
  "skip" adds a 1x1 conv of the down-sampled input image after each down block, "residual" (NCSN++) a 3x3 conv of
  the running auxiliary image, fused with the down-sampling, averaged with it by 1/sqrt(2);
- decoder "dec": at the lowest resolution two blocks (the first with attention), elsewhere an up-sampling block;
  then num_blocks + 1 blocks, each taking the matching encoder map concatenated; attention at attn_resolutions
  (SongUNet: only in the last block of a level); the output: SongUNet GroupNorm - SiLU - 3x3 conv at the top
  ("aux_norm", "aux_conv"; decoder_type "skip" sums such an output from every level, up-sampled), DhariwalUNet
  "out_norm", "out_conv" after the decoder.
Blocks: SongUNet: skip scale sqrt(1/2), GroupNorm eps 1e-6, additive embedding, one attention head, resampling by
`resample_filter` with a 1x1 projection on the skip path; DhariwalUNet: skip scale 1, eps 1e-5, adaptive scale and
shift, attention heads of 64 channels (none below 64 channels), filter [1, 1].

`__call__(x, sigma, labels=None, *, train=False, return_features=False, augment_labels=None)` (`DenoiserSpec`):
x (B, R, R, C) float32 in the data's scale, sigma (B,) or a scalar > 0, labels (B,) int when num_classes > 0;
returns D(x; sigma) (B, R, R, C) float32, or (D, features) with "mid" (after the lowest-resolution blocks) and
f"dec{r}" (the decoder's last map at resolution r). Dropout (and label dropout) draw from the `dropout` rng stream
when `train`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.edm import PARAMETERISATIONS
from kdjax.models.edm import coefficients as edm_coefficients
from kdjax.models.edm_official_layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, UNetBlock, norm_groups,
                                              positional_embedding)
from kdjax.models.interface import DenoiserSpec

MODEL_TYPES = ("SongUNet", "DhariwalUNet")
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
CHANNELS_PER_HEAD = 64  # DhariwalUNet's attention heads


@dataclasses.dataclass(frozen=True)
class Arch:
    """The architecture of F: the official network's constructor arguments (hashable, a module field)."""

    model_type: str
    resolution: int
    model_channels: int
    channel_mult: tuple[int, ...]
    channel_mult_emb: int
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    label_dropout: float
    augment_dim: int
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[float, ...] = (1, 1)

    @property
    def song(self) -> bool:
        return self.model_type == "SongUNet"

    def noise_channels(self) -> int:
        """The width of the noise embedding."""
        return self.model_channels * (self.channel_mult_noise if self.song else 1)

    def num_blocks_total(self) -> int:
        """The number of `UNetBlock`s in F: encoder, down, middle, up and decoder blocks."""
        levels = len(self.channel_mult)
        return levels * self.num_blocks + levels * (self.num_blocks + 1) + 2 * (levels - 1) + 2

    def stem_width(self) -> int:
        return self.model_channels if self.song else self.model_channels * self.channel_mult[0]

    def heads(self, features: int, attention: bool) -> int:
        if not attention:
            return 0
        return 1 if self.song else features // CHANNELS_PER_HEAD

    def block(self, features: int, attention: bool = False, up: bool = False, down: bool = False) -> dict[str, Any]:
        """The `UNetBlock` fields of a block (official `block_kwargs`)."""
        if self.song:
            extra = dict(skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=tuple(self.resample_filter),
                         resample_proj=True, adaptive_scale=False)
        else:
            extra = dict(skip_scale=1.0, eps=1e-5, resample_filter=(1, 1), resample_proj=False, adaptive_scale=True)
        return dict(features=features, up=up, down=down, num_heads=self.heads(features, attention),
                    dropout=self.dropout, **extra)

    def norm_widths(self) -> list[int]:
        """The channel count of every GroupNorm in F (encoder maps, and decoder inputs with their skips)."""
        c = self.stem_width()
        skips = [c]
        for level, mult in enumerate(self.channel_mult):
            if level:
                skips.append(c)
            for _ in range(self.num_blocks):
                c = self.model_channels * mult
                skips.append(c)
        widths = set(skips)
        for mult in reversed(self.channel_mult):
            for _ in range(self.num_blocks + 1):
                widths.add(c + skips.pop())
                c = self.model_channels * mult
        return sorted(widths)


class Encoder(nn.Module):
    """F's encoder, official `model.enc` (module docstring): -> (x, the skip maps in order)."""

    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        a, dt = self.arch, self.dtype
        block = lambda h, name, *args, **kw: UNetBlock(**a.block(*args, **kw), dtype=dt, name=name)(h, emb, train)
        aux, skips = x, []
        for level, mult in enumerate(a.channel_mult):
            r = f"{a.resolution >> level}x{a.resolution >> level}"
            if level == 0:
                x = Conv2d(a.stem_width(), 3, dtype=dt, name=f"{r}_conv")(x)
                skips.append(x)
            else:
                x = block(x, f"{r}_down", x.shape[-1], down=True)
                skips.append(x)
                if a.encoder_type == "skip":
                    aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=a.resample_filter, dtype=dt,
                                 name=f"{r}_aux_down")(aux)
                    x = skips[-1] = x + Conv2d(x.shape[-1], 1, dtype=dt, name=f"{r}_aux_skip")(aux)
                elif a.encoder_type == "residual":
                    aux = Conv2d(x.shape[-1], 3, down=True, resample_filter=a.resample_filter, fused_resample=True,
                                 dtype=dt, name=f"{r}_aux_residual")(aux)
                    x = skips[-1] = aux = (x + aux) / math.sqrt(2)
            for idx in range(a.num_blocks):
                attention = (a.resolution >> level) in a.attn_resolutions
                x = block(x, f"{r}_block{idx}", a.model_channels * mult, attention)
                skips.append(x)
        return x, skips


class Decoder(nn.Module):
    """F's decoder, official `model.dec` (module docstring): -> (SongUNet's output or the last map, features)."""

    arch: Arch
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], emb: jax.Array, train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        a, dt = self.arch, self.dtype
        block = lambda h, name, *args, **kw: UNetBlock(**a.block(*args, **kw), dtype=dt, name=name)(h, emb, train)
        last = len(a.channel_mult) - 1
        skips, aux, features = list(skips), None, {}
        for level in range(last, -1, -1):
            res = a.resolution >> level
            r = f"{res}x{res}"
            if level == last:
                x = block(x, f"{r}_in0", x.shape[-1], attention=True)
                x = block(x, f"{r}_in1", x.shape[-1])
                features["mid"] = x
            else:
                x = block(x, f"{r}_up", x.shape[-1], up=True)
            for idx in range(a.num_blocks + 1):
                attention = res in a.attn_resolutions and (idx == a.num_blocks or not a.song)
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(x, f"{r}_block{idx}", a.model_channels * a.channel_mult[level], attention)
            features[f"dec{res}"] = x
            if a.song and (a.decoder_type == "skip" or level == 0):
                if a.decoder_type == "skip" and level < last:
                    aux = Conv2d(self.out_channels, 0, up=True, resample_filter=a.resample_filter, dtype=dt,
                                 name=f"{r}_aux_up")(aux)
                h = nn.silu(GroupNorm(1e-6, dt, name=f"{r}_aux_norm")(x))
                h = Conv2d(self.out_channels, 3, dtype=dt, name=f"{r}_aux_conv")(h)
                aux = h if aux is None else h + aux
        return (aux if a.song else x), features


class UNet(nn.Module):
    """F (official SongUNet or DhariwalUNet, `arch.model_type`): (c_in x, c_noise, one-hot labels or None,
    augmentation labels or None) -> (F float32, features)."""

    arch: Arch
    out_channels: int
    dtype: Any = jnp.float32

    def label_dropout(self, labels: jax.Array, train: bool) -> jax.Array:
        """Official label dropout (classifier-free guidance training): a row's labels zeroed with that rate."""
        if not (train and self.arch.label_dropout):
            return labels
        keep = jax.random.uniform(self.make_rng("dropout"), (labels.shape[0], 1)) >= self.arch.label_dropout
        return labels * keep.astype(labels.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, class_labels: jax.Array | None,
                 augment_labels: jax.Array | None, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        a, dt = self.arch, self.dtype
        emb_channels = a.model_channels * a.channel_mult_emb
        noise_channels = a.noise_channels()
        if a.song and a.embedding_type == "fourier":
            emb = FourierEmbedding(noise_channels, name="map_noise")(c_noise)
        else:
            emb = positional_embedding(c_noise, noise_channels, endpoint=a.song)
        augment = None
        if a.augment_dim:  # the weight exists whether or not labels are given (official: unused without them)
            zeros = jnp.zeros((x.shape[0], a.augment_dim), jnp.float32)
            augment = Linear(noise_channels, bias=False, dtype=dt, name="map_augment")(
                zeros if augment_labels is None else augment_labels)
        if a.song:
            half = noise_channels // 2
            emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)  # [sin, cos]
            if class_labels is not None:
                scaled = self.label_dropout(class_labels, train) * math.sqrt(class_labels.shape[1])
                emb = emb + Linear(noise_channels, dtype=dt, name="map_label")(scaled)
            if augment_labels is not None:
                emb = emb + augment
            emb = nn.silu(Linear(emb_channels, dtype=dt, name="map_layer0")(emb))
            emb = nn.silu(Linear(emb_channels, dtype=dt, name="map_layer1")(emb))
        else:
            if augment_labels is not None:
                emb = emb + augment
            emb = nn.silu(Linear(emb_channels, dtype=dt, name="map_layer0")(emb))
            emb = Linear(emb_channels, dtype=dt, name="map_layer1")(emb)
            if class_labels is not None:
                emb = emb + Linear(emb_channels, bias=False, dtype=dt, name="map_label")(
                    self.label_dropout(class_labels, train))
            emb = nn.silu(emb)
        h, skips = Encoder(a, dt, name="enc")(x.astype(dt), emb, train)
        h, features = Decoder(a, self.out_channels, dt, name="dec")(h, skips, emb, train)
        if not a.song:
            h = nn.silu(GroupNorm(1e-5, dt, name="out_norm")(h))
            h = Conv2d(self.out_channels, 3, dtype=dt, name="out_conv")(h)
        return h.astype(jnp.float32), features


class EDMOfficialDenoiser(nn.Module):
    """EDM's preconditioning around F (module docstring); the fields both official networks take. Use
    `EDMSongUNet` or `EDMDhariwalUNet`, which add their own and the official defaults."""

    resolution: int = 32  # official img_resolution, from the data
    channels: int = 3  # official img_channels, from the data
    num_classes: int = 0  # official label_dim, from the data when conditional
    sigma_data: float = 0.5  # the data's standard deviation s_d in the preconditioning
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    augment_dim: int = 0  # official augmentation conditioning (0 = none); its labels are optional at call time
    parameterisation: str = "edm"  # "edm" (a denoiser) or "consistency" (a consistency function)
    sigma_min: float = 0.002  # the consistency function's boundary level (parameterisation "consistency")
    dtype: Any = jnp.float32  # compute dtype; parameters, statistics, attention and the output are float32

    MODEL_TYPE: ClassVar[str] = ""
    KIND: ClassVar[str] = "denoiser"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(self.resolution, self.channels, self.num_classes, self.sigma_data)

    def arch(self) -> Arch:
        return Arch(self.MODEL_TYPE, self.resolution, self.model_channels, tuple(self.channel_mult),
                    self.channel_mult_emb, self.num_blocks, tuple(self.attn_resolutions), self.dropout,
                    self.label_dropout, self.augment_dim)

    def check(self) -> None:
        """Raises ValueError naming the first field that cannot work (called by `__call__`)."""
        a = self.arch()
        levels = len(a.channel_mult)
        if a.model_type not in MODEL_TYPES:
            raise ValueError(f"{type(self).__name__} names no official network; use EDMSongUNet or EDMDhariwalUNet.")
        if self.model_channels < 1 or levels < 1 or any(m < 1 for m in a.channel_mult):
            raise ValueError(f"model_channels={self.model_channels} and channel_mult={a.channel_mult} must be "
                             "positive and non-empty.")
        if a.noise_channels() < 4 or a.noise_channels() % 2:
            raise ValueError(f"model_channels={self.model_channels}: the noise embedding's width "
                             f"{a.noise_channels()} must be even and >= 4.")
        if self.channel_mult_emb < 1 or self.num_blocks < 0 or self.augment_dim < 0:
            raise ValueError(f"channel_mult_emb={self.channel_mult_emb} must be >= 1, num_blocks={self.num_blocks} "
                             f"and augment_dim={self.augment_dim} >= 0.")
        if self.resolution < 1 or self.resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution={self.resolution} must be a positive multiple of 2^(levels - 1) = "
                             f"{2 ** (levels - 1)} for channel_mult={a.channel_mult}.")
        for w in a.norm_widths():
            if norm_groups(w) < 1 or w % norm_groups(w):
                raise ValueError(f"model_channels={self.model_channels}, channel_mult={a.channel_mult}: a GroupNorm "
                                 f"over {w} channels has min(32, {w} // 4) groups, which do not divide it.")
        for mult in a.channel_mult:
            width, heads = self.model_channels * mult, a.heads(self.model_channels * mult, True)
            if heads and width % heads:
                raise ValueError(f"model_channels={self.model_channels}, channel_mult={a.channel_mult}: {width} "
                                 f"channels do not split into {heads} attention heads.")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.label_dropout < 1.0):
            raise ValueError(f"dropout={self.dropout} and label_dropout={self.label_dropout} must be in [0, 1).")
        if not (self.sigma_data > 0 and self.sigma_min > 0):
            raise ValueError(f"sigma_data={self.sigma_data} and sigma_min={self.sigma_min} must be > 0.")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation={self.parameterisation!r}; valid: {list(PARAMETERISATIONS)}.")
        if self.num_classes < 0 or self.channels < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 and channels={self.channels} >= 1.")

    def coefficients(self, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(c_skip, c_out, c_in, c_noise) of the model's parameterisation at `sigma`."""
        return edm_coefficients(self.parameterisation, sigma, self.sigma_data, self.sigma_min)

    @nn.compact
    def __call__(self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False, augment_labels: jax.Array | None = None):
        """D(x; sigma) (module docstring): x (B, R, R, C), sigma (B,) or a scalar, labels (B,) when conditional,
        augment_labels (B, augment_dim) optionally when augment_dim > 0."""
        self.check()
        shape = (self.resolution, self.resolution, self.channels)
        if x.ndim != 4 or x.shape[1:] != shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}), got {x.shape}.")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels must be given exactly when num_classes > 0 (num_classes={self.num_classes}).")
        if augment_labels is not None and augment_labels.shape != (x.shape[0], self.augment_dim):
            raise ValueError(f"augment_labels must have shape (B, augment_dim={self.augment_dim}), got "
                             f"{augment_labels.shape}.")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        expand = lambda c: c[:, None, None, None]
        x = x.astype(jnp.float32)
        one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32) if self.num_classes else None
        f, features = UNet(self.arch(), self.channels, self.dtype, name="model")(
            expand(c_in) * x, c_noise, one_hot, augment_labels, train)
        denoised = expand(c_skip) * x + expand(c_out) * f
        return (denoised, features) if return_features else denoised


class EDMSongUNet(EDMOfficialDenoiser):
    """EDMPrecond(model_type='SongUNet'): DDPM++ (the defaults) or NCSN++ (embedding_type 'fourier',
    channel_mult_noise 2, encoder_type 'residual', resample_filter (1, 3, 3, 1)); the official CIFAR-10 pickles
    use channel_mult (2, 2, 2) and augment_dim 9."""

    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[float, ...] = (1, 1)

    MODEL_TYPE: ClassVar[str] = "SongUNet"

    def arch(self) -> Arch:
        return dataclasses.replace(super().arch(), embedding_type=self.embedding_type,
                                   channel_mult_noise=self.channel_mult_noise, encoder_type=self.encoder_type,
                                   decoder_type=self.decoder_type, resample_filter=tuple(self.resample_filter))

    def check(self) -> None:
        for name, valid in (("embedding_type", EMBEDDING_TYPES), ("encoder_type", ENCODER_TYPES),
                            ("decoder_type", DECODER_TYPES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {list(valid)}.")
        f = tuple(self.resample_filter)
        if not f or len(f) % 2 or not all(v > 0 for v in f):
            raise ValueError(f"resample_filter={f} must be an even number of positive taps (official: (1, 1) or "
                             "(1, 3, 3, 1)).")
        if self.channel_mult_noise < 1:
            raise ValueError(f"channel_mult_noise={self.channel_mult_noise} must be >= 1.")
        super().check()


class EDMDhariwalUNet(EDMOfficialDenoiser):
    """EDMPrecond(model_type='DhariwalUNet'): ADM (the official ImageNet-64 pickle's network), official defaults."""

    resolution: int = 64
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)

    MODEL_TYPE: ClassVar[str] = "DhariwalUNet"

