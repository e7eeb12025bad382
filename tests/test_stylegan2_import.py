"""Official-pickle import: a pickle written here with torch in the official structure converts, loads and
matches an independent torch implementation of the official formulas; unsafe pickles are refused unrun."""

import math
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kdjax import stylegan2_import as si_cli  # noqa: E402
from kdjax.importers import stylegan2 as si  # noqa: E402

from official_pickle import CFG, FILTER2D, write_pickle  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("pkl") / "network-snapshot.pkl"
    g = write_pickle(path)
    return path, g


# --- an independent torch implementation of the official forward (reference paths) ----------------------

def t_upfirdn2d(x, up=1, pad=(0, 0, 0, 0), gain=1.0):
    """Official `_upfirdn2d_ref` for the [1,3,3,1] filter (NCHW, non-negative padding)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, list(pad))
    f = (FILTER2D * gain).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, f, groups=c)


def t_modconv(x, weight, styles, demodulate, up=1, padding=0):
    """Official `modulated_conv2d`, fused form, with the generic `conv2d_resample` path."""
    b, _, h, w = x.shape
    o, i, kh, kw = weight.shape
    wt = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        wt = wt * (wt.square().sum([2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
    x = x.reshape(1, b * i, h, w)
    wt = wt.reshape(b * o, i, kh, kw)
    if up > 1:   # flip_weight=False for up-sampling layers: a true convolution
        x = t_upfirdn2d(x, up=2, pad=(padding + 2, padding + 1, padding + 2, padding + 1), gain=4)
        x = F.conv2d(x, wt.flip([2, 3]), groups=b)
    else:
        x = F.conv2d(x, wt, padding=padding, groups=b)
    return x.reshape(b, o, *x.shape[2:])


def t_fc(m, x, act=False, lr=1.0):
    x = x @ (m.weight * (lr / math.sqrt(m.weight.shape[1]))).t() + m.bias * lr
    return F.leaky_relu(x, 0.2) * math.sqrt(2) if act else x


def t_mapping(g, z, c, num_ws, psi=1.0):
    norm = lambda v: v * (v.square().mean(1, keepdim=True) + 1e-8).rsqrt()
    x = torch.cat([norm(z), norm(t_fc(g.mapping.embed, c))], 1)
    for i in range(CFG["num_layers"]):
        x = t_fc(getattr(g.mapping, f"fc{i}"), x, act=True, lr=0.01)
    x = x[:, None].repeat(1, num_ws, 1)
    return g.mapping.w_avg.lerp(x, psi)


def t_synthesis(g, ws, clamp):
    def layer(m, x, w, up=1):
        x = t_modconv(x, m.weight, t_fc(m.affine, w), True, up=up, padding=1)
        x = x + m.noise_const * m.noise_strength
        x = F.leaky_relu(x + m.bias[None, :, None, None], 0.2) * math.sqrt(2)
        return x.clamp(-clamp, clamp)

    x = img = None
    idx = 0
    feats = {}
    res = 4
    while res <= CFG["img_resolution"]:
        b = getattr(g.synthesis, f"b{res}")
        if res == 4:
            x = layer(b.conv1, b.const[None].repeat(ws.shape[0], 1, 1, 1), ws[:, 0])
            n = 1
        else:
            x = layer(b.conv0, x, ws[:, idx], up=2)
            x = layer(b.conv1, x, ws[:, idx + 1])
            n = 2
        t = b.torgb
        y = t_modconv(x, t.weight, t_fc(t.affine, ws[:, idx + n]) / math.sqrt(t.weight.shape[1]), False)
        y = (y + t.bias[None, :, None, None]).clamp(-clamp, clamp)
        img = y if img is None else t_upfirdn2d(img, up=2, pad=(2, 1, 2, 1), gain=4) + y
        feats[f"res{res}"] = x
        idx += n
        res *= 2
    return img, feats


# --- tests -------------------------------------------------------------------------------------------------

def test_convert_command_load_and_generate(official, tmp_path):
    path, _ = official
    out = tmp_path / "teacher"
    si_cli.main([f"--pkl={path}", f"--out={out}"])
    gen, variables = si.load_teacher(out)
    kw = {k: getattr(gen, k) for k in ("z_dim", "w_dim", "c_dim", "img_resolution", "channel_base",
                                       "channel_max", "mapping_layers", "conv_clamp")}
    assert kw == dict(z_dim=16, w_dim=24, c_dim=3, img_resolution=16, channel_base=256, channel_max=32,
                      mapping_layers=3, conv_clamp=256.0)
    assert set(variables) == {"params", "w_avg", "noise_consts"}
    z = jax.random.normal(jax.random.key(0), (2, 16))
    img = gen.apply(variables, z, jnp.array([0, 2]), rngs={"noise": jax.random.key(1)})
    assert img.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(img)))


def test_converted_generator_matches_official_formulas(official):
    path, g = official
    kwargs, variables = si.convert_generator(si.load_network_pickle(path)["G_ema"])
    from kdjax.models.stylegan2 import Generator
    gen = Generator(**kwargs)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 16)).astype(np.float32)
    labels = np.array([0, 1, 2])
    ws = gen.apply(variables, jnp.asarray(z), jnp.asarray(labels), method="mapping", truncation_psi=0.7)
    img, feats = gen.apply(variables, ws, method="synthesis", noise_mode="const", return_features=True)
    with torch.no_grad():
        c = F.one_hot(torch.tensor(labels), 3).float()
        t_ws = t_mapping(g, torch.tensor(z), c, gen.num_ws, psi=0.7)
        t_img, t_feats = t_synthesis(g, torch.tensor(np.asarray(ws)), CFG["conv_clamp"])
    np.testing.assert_allclose(np.asarray(ws), t_ws.numpy(), rtol=1e-4, atol=1e-4)
    # One modulated conv layer (b8.conv0: 2x up-sampling, demodulation, const noise, bias_act, clamp).
    np.testing.assert_allclose(np.asarray(feats["res8"]), t_feats["res8"].permute(0, 2, 3, 1).numpy(),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(img), t_img.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-3)


def test_stylegan3_layout_with_active_clamping_matches_official(tmp_path):
    """stylegan3's Generator takes the synthesis kwargs flat (`**synthesis_kwargs`), so its pickles record
    conv_clamp in init_kwargs itself. With conv_clamp=2 clamping changes the image by far more than the
    tolerance, and the converted generator must clamp exactly as the official formulas do."""
    path = tmp_path / "stylegan3.pkl"
    g = write_pickle(path, cfg=dict(CFG, conv_clamp=2.0), layout="stylegan3")
    assert "synthesis_kwargs" not in g._init_kwargs and g._init_kwargs["conv_clamp"] == 2.0
    kwargs, variables = si.convert_generator(si.load_network_pickle(path)["G_ema"])
    assert kwargs["conv_clamp"] == 2.0 and (kwargs["channel_base"], kwargs["channel_max"]) == (256, 32)
    from kdjax.models.stylegan2 import Generator
    gen = Generator(**kwargs)
    z = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    ws = gen.apply(variables, jnp.asarray(z), jnp.array([0, 1, 2]), method="mapping")
    img = gen.apply(variables, ws, method="synthesis", noise_mode="const")
    with torch.no_grad():
        t_img = t_synthesis(g, torch.tensor(np.asarray(ws)), 2.0)[0].permute(0, 2, 3, 1).numpy()
        unclamped = t_synthesis(g, torch.tensor(np.asarray(ws)), math.inf)[0].permute(0, 2, 3, 1).numpy()
    assert np.abs(t_img - unclamped).max() > 1.0          # clamping is really active
    np.testing.assert_allclose(np.asarray(img), t_img, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["stylegan2-ada", "stylegan3"])
@pytest.mark.parametrize("option, value, message", [
    ("architecture", "resnet", "architecture='resnet'"), ("resample_filter", [1, 2, 1], "resample_filter"),
    ("channel_max", 64, "channel_max=64"), ("conv_clamp", "256", "conv_clamp='256'")])
def test_unsupported_synthesis_options_are_refused_in_both_layouts(tmp_path, layout, option, value, message):
    def mutate(g):
        target = g._init_kwargs["synthesis_kwargs"] if layout == "stylegan2-ada" else g._init_kwargs
        target[option] = value
    path = tmp_path / "net.pkl"
    write_pickle(path, mutate=mutate, layout=layout)
    with pytest.raises(si.NetworkPickleError, match=re.escape(message)):
        si.convert_generator(si.load_network_pickle(path)["G_ema"])


def test_a_synthesis_option_given_both_ways_is_refused(tmp_path):
    path = tmp_path / "net.pkl"
    write_pickle(path, mutate=lambda g: g._init_kwargs.update(conv_clamp=2.0))   # flat and nested
    with pytest.raises(si.NetworkPickleError, match="'conv_clamp' both flat and in synthesis_kwargs"):
        si.convert_generator(si.load_network_pickle(path)["G_ema"])


def test_shape_inference_without_init_kwargs(official, tmp_path):
    path = tmp_path / "bare.pkl"
    write_pickle(path, mutate=lambda g: setattr(g, "_init_kwargs", {}))
    g = si.load_network_pickle(path)["G_ema"]
    kwargs, _ = si.convert_generator(g)
    assert kwargs["conv_clamp"] is None   # not recoverable from shapes; the command has --conv_clamp
    assert {k: kwargs[k] for k in ("z_dim", "w_dim", "c_dim", "img_resolution", "img_channels",
                                   "channel_base", "channel_max", "mapping_layers")} == dict(
        z_dim=16, w_dim=24, c_dim=3, img_resolution=16, img_channels=3, channel_base=256,
        channel_max=32, mapping_layers=3)


def test_missing_and_extra_names_are_reported(tmp_path):
    def mutate(g):
        del g.mapping.fc1._parameters["bias"]
        g.synthesis.b8.conv0.register_buffer("mystery", torch.zeros(3))
    path = tmp_path / "bad.pkl"
    write_pickle(path, mutate)
    with pytest.raises(ValueError) as e:
        si.convert_generator(si.load_network_pickle(path)["G_ema"])
    assert "synthesis.b8.conv0.mystery" in str(e.value)
    assert "mapping.fc1.bias" in str(e.value)


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "inside_network"])
def test_unsafe_pickle_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload, name = _Payload(os.system, f"touch {marker}"), "posix.system"
    else:
        payload, name = _Payload(eval, f"open({str(marker)!r}, 'w').write('x')"), "builtins.eval"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(eval, f"open({str(control)!r}, 'w').write('x')")))
    assert control.exists()    # the payload kind is live: plain pickle runs it
    path = tmp_path / "evil.pkl"
    if kind == "inside_network":
        write_pickle(path, mutate=lambda g: setattr(g, "evil", payload))
    else:
        path.write_bytes(pickle.dumps({"G_ema": payload}))
    with pytest.raises(si.UnsafePickleError, match=name.replace(".", r"\.")):
        si.load_network_pickle(path)
    assert not marker.exists()


def test_module_src_is_never_executed(official):
    # module_src is 'raise SystemExit(...)': loading returns plain data and drops it unread.
    data = si.load_network_pickle(official[0])
    g = data["G_ema"]
    assert isinstance(g, si.PersistentObject) and g["class_name"] == "Generator"
    assert "module_src" not in g
    assert isinstance(data["training_set_kwargs"], dict)
    assert isinstance(g["state"]["_modules"]["mapping"]["state"]["_modules"]["fc0"]["state"]["weight_gain"],
                      np.floating)


def test_pickle_from_a_url_is_downloaded_once_and_converts_the_same(official, tmp_path):
    """--pkl as an http URL (a loopback server) converts to the same bundle as the path; a second fetch reads
    the cache (the server is gone by then); a failed download names the URL and leaves no partial file."""
    import functools
    import http.server
    import threading

    path, _ = official
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    try:
        fetched = si.fetch_pickle(url, tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert fetched.read_bytes() == path.read_bytes() and fetched.name.endswith(path.name)
    assert si.fetch_pickle(url, tmp_path / "cache") == fetched  # cached: no server needed
    si.import_pickle(url, tmp_path / "from_url", cache_dir=tmp_path / "cache")
    si.import_pickle(path, tmp_path / "from_path")
    a, b = si.load_teacher(tmp_path / "from_url")[1], si.load_teacher(tmp_path / "from_path")[1]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert si.fetch_pickle(path.as_uri(), tmp_path / "cache2").read_bytes() == path.read_bytes()  # file:// URL

    dead = f"http://127.0.0.1:{server.server_address[1]}/gone.pkl"  # the server is shut down
    with pytest.raises(OSError, match="gone.pkl"):
        si.fetch_pickle(dead, tmp_path / "cache3")
    assert not [p for p in (tmp_path / "cache3" / "pickles").iterdir()]
    with pytest.raises(FileNotFoundError, match="no_such.pkl"):
        si.fetch_pickle(tmp_path / "no_such.pkl")


def test_command_reports_a_bad_pickle_path_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        si_cli.main([f"--pkl={tmp_path / 'no_such.pkl'}", f"--out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kdjax: error:") and "no_such.pkl" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
