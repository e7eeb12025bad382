"""Writes StyleGAN2 network pickles in the official stylegan2-ada-pytorch structure, with torch, for tests.

No official pickle can be downloaded here, so the converter's tests (and the import notebook's CI mode) build
one: `torch_utils.persistence`-style modules of random weights, with the parameter and buffer names of the
official code, pickled with throwaway stand-ins of the official modules registered so that the file names
the same globals as a real network pickle (`write_pickle`). Needs torch (the `test` extra).
"""

import contextlib
import pickle
import sys
import types

import numpy as np
import torch

# A small conditional generator in the official structure.
CFG = dict(z_dim=16, w_dim=24, c_dim=3, img_resolution=16, img_channels=3, channel_base=256,
           channel_max=32, num_layers=3, conv_clamp=256.0)
FILTER = torch.tensor([1.0, 3.0, 3.0, 1.0])
FILTER2D = torch.outer(FILTER, FILTER) / torch.outer(FILTER, FILTER).sum()


# --- writing official-format pickles ---------------------------------------------------------------------

@contextlib.contextmanager
def fake_official_modules():
    """Registers throwaway `torch_utils.persistence` and `dnnlib.util` modules while pickling, so that the
    file names the same globals as a real network pickle. Their reconstructor would fail if ever called."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {n: sys.modules.get(n) for n in names}
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("the official reconstructor must never run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    util.EasyDict = easydict
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util})
    try:
        yield persistence, easydict
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class Persistent(torch.nn.Module):
    """Pickles like an official `@persistence.persistent_class` module."""
    _orig_class_name = "Module"

    def __init__(self, class_name, **init_kwargs):
        super().__init__()
        self._orig_class_name = class_name
        self._init_args = ()
        self._init_kwargs = init_kwargs

    def __reduce__(self):   # the official Decorator.__reduce__
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=6, module_src="raise SystemExit('module_src was executed')",
                    class_name=self._orig_class_name, state=fields[2])
        fields[0] = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        fields[1] = (meta,)
        fields[2] = None
        return tuple(fields)


def _fc(i, o, bias_init=0.0, lr=1.0):
    m = Persistent("FullyConnectedLayer")
    m.weight = torch.nn.Parameter(torch.randn(o, i) / lr)
    m.bias = torch.nn.Parameter(torch.full([o], float(bias_init)) + 0.1 * torch.randn(o))
    m.weight_gain = np.float64(lr / np.sqrt(i))      # a numpy scalar, as in the official state
    return m


def _layer(i, o, w_dim, res, k=3):
    m = Persistent("SynthesisLayer")
    m.affine = _fc(w_dim, i, bias_init=1.0)
    m.weight = torch.nn.Parameter(torch.randn(o, i, k, k))
    m.register_buffer("resample_filter", FILTER2D.clone())
    m.register_buffer("noise_const", torch.randn(res, res))
    m.noise_strength = torch.nn.Parameter(torch.tensor(0.3))
    m.bias = torch.nn.Parameter(0.1 * torch.randn(o))
    return m


LAYOUTS = ("stylegan2-ada", "stylegan3")


def generator_init_kwargs(layout, z_dim, w_dim, c_dim, img_resolution, img_channels, channel_base, channel_max,
                          num_layers, conv_clamp, easydict=dict):
    """The official Generator's recorded constructor kwargs (`_init_kwargs`) in either repository's layout.

    stylegan2-ada-pytorch, training/networks.py: Generator(z_dim, c_dim, w_dim, img_resolution, img_channels,
    mapping_kwargs={}, synthesis_kwargs={}). stylegan3, training/networks_stylegan2.py: Generator(..,
    mapping_kwargs={}, **synthesis_kwargs), which its train.py fills flat (plus fused_modconv_default).
    """
    synthesis = dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=4, conv_clamp=conv_clamp)
    kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                  img_channels=img_channels, mapping_kwargs=easydict(num_layers=num_layers))
    if layout == "stylegan2-ada":
        return dict(kwargs, synthesis_kwargs=easydict(synthesis))
    assert layout == "stylegan3", layout
    return dict(kwargs, **synthesis, fused_modconv_default="inference_only")


def build_official_generator(z_dim, w_dim, c_dim, img_resolution, img_channels, channel_base, channel_max,
                             num_layers, conv_clamp, easydict=dict, layout="stylegan2-ada"):
    torch.manual_seed(0)
    g = Persistent("Generator", **generator_init_kwargs(
        layout, z_dim, w_dim, c_dim, img_resolution, img_channels, channel_base, channel_max, num_layers,
        conv_clamp, easydict))
    g.z_dim = z_dim
    mapping = Persistent("MappingNetwork")
    if c_dim:
        mapping.embed = _fc(c_dim, w_dim)
    feats = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * num_layers
    for i in range(num_layers):
        setattr(mapping, f"fc{i}", _fc(feats[i], feats[i + 1], lr=0.01))
    mapping.register_buffer("w_avg", torch.randn(w_dim))
    synthesis = Persistent("SynthesisNetwork")
    ch = {r: min(channel_base // r, channel_max) for r in [2 ** i for i in range(2, 11)]}
    res = 4
    while res <= img_resolution:
        b = Persistent("SynthesisBlock")
        if res == 4:
            b.const = torch.nn.Parameter(torch.randn(ch[4], 4, 4))
        else:
            b.conv0 = _layer(ch[res // 2], ch[res], w_dim, res)
        b.conv1 = _layer(ch[res], ch[res], w_dim, res)
        t = Persistent("ToRGBLayer")
        t.affine = _fc(w_dim, ch[res], bias_init=1.0)
        t.weight = torch.nn.Parameter(torch.randn(img_channels, ch[res], 1, 1))
        t.bias = torch.nn.Parameter(0.1 * torch.randn(img_channels))
        b.torgb = t
        b.register_buffer("resample_filter", FILTER2D.clone())
        setattr(synthesis, f"b{res}", b)
        res *= 2
    g.synthesis, g.mapping = synthesis, mapping
    return g


def write_pickle(path, mutate=None, cfg=CFG, layout="stylegan2-ada"):
    """Writes {G, D, G_ema, augment_pipe, training_set_kwargs} to `path` as the official code would (`layout`:
    one of LAYOUTS, see `generator_init_kwargs`); returns the torch generator."""
    with fake_official_modules() as (_, easydict):
        g = build_official_generator(**cfg, easydict=easydict, layout=layout)
        if mutate:
            mutate(g)
        data = dict(G=g, D=None, G_ema=g, augment_pipe=None,
                    training_set_kwargs=easydict(resolution=cfg["img_resolution"], use_labels=True))
        with open(path, "wb") as f:
            pickle.dump(data, f)
    return g
