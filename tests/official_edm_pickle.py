"""Writes NVlabs/edm network pickles in the official layout, with torch, for tests; and computes their forward pass.

No official pickle can be downloaded here, so the importer's tests build one: the official network classes of
NVlabs/edm `training/networks.py` (EDMPrecond around SongUNet or DhariwalUNet, with Linear, Conv2d, GroupNorm,
UNetBlock and the noise embeddings), re-written here in torch with the official structure, attribute names and
forward formulas, so that the state dict (and so the pickle) holds the official keys
(`model.enc.16x16_block0.conv0.weight`, `model.dec.8x8_in0.qkv.weight`, ...). The containers `enc` and `dec` are
real `torch.nn.ModuleDict`s, pickled as a real network pickle pickles them. Weights are random (not the official
zero initialisation), so every path of the network counts in the parity test. `EDMPrecond.forward` is the
independent reference: it uses torch's own (transposed) convolutions and group norm.

`write_pickle(path, cfg)` writes {ema, loss_fn, augment_pipe, dataset_kwargs} as NVlabs/edm's training loop does
and returns the torch network. Needs torch (the `test` extra).
"""

import math
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F

from official_pickle import Persistent, fake_official_modules  # tests/ is on sys.path

# Tiny networks in the official configurations (train.py's --arch), at 8x8.
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.13, use_fp16=False)
CONFIGS = {
    "ddpmpp_cond": dict(TINY, **DDPMPP, label_dim=5, augment_dim=9),
    "ddpmpp_uncond": dict(TINY, **DDPMPP, label_dim=0),
    "ncsnpp_cond": dict(TINY, **NCSNPP, label_dim=4),
    "song_skip_uncond": dict(TINY, **dict(DDPMPP, encoder_type="skip", decoder_type="skip"), label_dim=0),
    # 128 channels at 4x4: two attention heads; 64 at 8x8 with attention: one head.
    "adm_cond": dict(TINY, model_type="DhariwalUNet", model_channels=64, attn_resolutions=[8, 4], label_dim=3,
                     augment_dim=9),
    # 32 channels at 8x8: no attention heads there (fewer than 64 channels); one at 4x4.
    "adm_uncond": dict(TINY, model_type="DhariwalUNet", model_channels=32, attn_resolutions=[8, 4], label_dim=0),
}


def _param(*shape, scale=1.0, mean=0.0):
    return torch.nn.Parameter(mean + scale * torch.randn(*shape))


class Linear(Persistent):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__("Linear", in_features=in_features, out_features=out_features, bias=bias)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, scale=1 / math.sqrt(in_features))
        self.bias = _param(out_features, scale=0.1) if bias else None

    def forward(self, x):
        x = x @ self.weight.t()
        return x + self.bias if self.bias is not None else x


class Conv2d(Persistent):
    """Official Conv2d: resampling by a separable filter through torch's (transposed) depthwise convolutions."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False):
        super().__init__("Conv2d", in_channels=in_channels, out_channels=out_channels, kernel=kernel, bias=bias,
                         up=up, down=down, resample_filter=list(resample_filter), fused_resample=fused_resample)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = _param(out_channels, in_channels, kernel, kernel, scale=fan_in ** -0.5) if kernel else None
        self.bias = _param(out_channels, scale=0.1) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w, f = self.weight, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                       padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else x


class GroupNorm(Persistent):
    def __init__(self, num_channels, eps=1e-5):
        super().__init__("GroupNorm", num_channels=num_channels, eps=eps)
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = _param(num_channels, scale=0.2, mean=1.0)
        self.bias = _param(num_channels, scale=0.2)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(Persistent):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=None,
                 channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True):
        super().__init__("UNetBlock", in_channels=in_channels, out_channels=out_channels, emb_channels=emb_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q, k / np.sqrt(k.shape[1])).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", weights, v)
            x = (self.proj(a.reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(Persistent):
    def __init__(self, num_channels, endpoint=False):
        super().__init__("PositionalEmbedding", num_channels=num_channels, endpoint=endpoint)
        self.num_channels, self.endpoint = num_channels, endpoint

    def forward(self, x):
        freqs = torch.arange(self.num_channels // 2, dtype=torch.float32) / (self.num_channels // 2 - self.endpoint)
        x = torch.outer(x, (1 / 10000) ** freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(Persistent):
    def __init__(self, num_channels, scale=16):
        super().__init__("FourierEmbedding", num_channels=num_channels, scale=scale)
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, 2 * np.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(Persistent):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__("SongUNet", img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels)
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        blk = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)   # [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(Persistent):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0):
        super().__init__("DhariwalUNet", img_resolution=img_resolution, in_channels=in_channels,
                         out_channels=out_channels)
        emb_channels = model_channels * channel_mult_emb
        blk = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMPrecond(Persistent):
    """Official EDMPrecond(img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=inf,
    sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs); init_kwargs records what was passed, as the
    official decorator does. `class_name` (not official) names another preconditioner for tests."""

    def __init__(self, class_name="EDMPrecond", **kwargs):
        super().__init__(class_name, **kwargs)
        kwargs = dict(dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5,
                           model_type="DhariwalUNet"), **kwargs)
        for name in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"):
            setattr(self, name, kwargs.pop(name))
        net = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[kwargs.pop("model_type")]
        self.model = net(img_resolution=self.img_resolution, in_channels=self.img_channels,
                         out_channels=self.img_channels, label_dim=self.label_dim, **kwargs)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        f = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * f


class PlainPersistent:
    """Pickles like an official persistent class that is not a torch module (EDMLoss, AugmentPipe): its
    `__dict__` (with the recorded `_init_kwargs`) is the state."""

    def __init__(self, class_name, **attributes):
        self.__dict__.update(attributes, _init_args=(), _init_kwargs=dict(attributes))
        self.class_name = class_name

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "class_name"}
        meta = dict(type="class", version=6, module_src="raise SystemExit('module_src was executed')",
                    class_name=self.class_name, state=state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def build_network(cfg, seed=0):
    """The official `EDMPrecond` of `cfg` (a CONFIGS entry, or any official kwargs), random weights, eval mode."""
    torch.manual_seed(seed)
    return EDMPrecond(**cfg).eval().requires_grad_(False)


def write_pickle(path, cfg, mutate=None, seed=0):
    """Writes {ema, loss_fn, augment_pipe, dataset_kwargs} to `path` as NVlabs/edm's training loop does; returns the
    torch network (after `mutate(net)`, if given)."""
    with fake_official_modules():
        net = build_network(cfg, seed)
        if mutate:
            mutate(net)
        loss_fn = PlainPersistent("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
        augment_pipe = PlainPersistent("AugmentPipe", p=0.12, xflip=1e8, yflip=1.0, scale=1.0)
        data = dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                        use_labels=bool(cfg.get("label_dim")), xflip=False, cache=True,
                                        resolution=cfg["img_resolution"], max_size=50000))
        with open(path, "wb") as f:
            pickle.dump(data, f)
    return net
