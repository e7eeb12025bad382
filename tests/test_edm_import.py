"""NVlabs/edm pickle import: tiny networks in the official layout (written with torch by official_edm_pickle.py)
convert, and the Flax port's D(x; sigma) equals the official forward computed in torch; the command writes a
bundle that loads back; bad pickles end in one clear error; the imported denoiser samples with Heun."""

import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kdjax import edm_import, models  # noqa: E402
from kdjax.importers import edm as ei  # noqa: E402
from kdjax.importers.safe_pickle import load_network_pickle  # noqa: E402
from kdjax.models import bundles, diffusion_samplers  # noqa: E402

from official_edm_pickle import CONFIGS, write_pickle  # noqa: E402  (tests/ is on sys.path)

SIGMAS = np.array([0.002, 0.3, 2.0, 80.0], np.float32)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """{config name: (path, torch network)}, written once."""
    root = tmp_path_factory.mktemp("edm")
    return {name: (root / f"{name}.pkl", write_pickle(root / f"{name}.pkl", cfg)) for name, cfg in CONFIGS.items()}


def inputs(cfg, seed=0):
    """Noisy images x = y + sigma n (B, R, R, C) at SIGMAS, labels (B,) or None, augmentation labels or None."""
    rng = np.random.default_rng(seed)
    r, c = cfg["img_resolution"], cfg["img_channels"]
    x = rng.standard_normal((len(SIGMAS), r, r, c)) * np.sqrt(0.25 + SIGMAS[:, None, None, None] ** 2)
    labels = rng.integers(0, cfg["label_dim"], len(SIGMAS)) if cfg["label_dim"] else None
    augment = rng.standard_normal((len(SIGMAS), cfg["augment_dim"])) if cfg.get("augment_dim") else None
    return x.astype(np.float32), labels, None if augment is None else augment.astype(np.float32)


def torch_denoise(net, cfg, x, labels, augment=None):
    """The official EDMPrecond forward, NHWC in and out."""
    with torch.no_grad():
        one_hot = None if labels is None else F.one_hot(torch.tensor(labels), cfg["label_dim"]).float()
        out = net(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(SIGMAS), one_hot,
                  None if augment is None else torch.tensor(augment))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_denoiser_matches_the_official_forward(pickles, name):
    path, net = pickles[name]
    cfg = CONFIGS[name]
    model_name, fields, variables, meta = ei.convert_network(load_network_pickle(path)["ema"])
    assert model_name == ei.MODEL_NAMES[cfg["model_type"]] and meta["model_type"] == cfg["model_type"]
    assert fields["num_classes"] == cfg["label_dim"] and tuple(fields["channel_mult"]) == tuple(cfg["channel_mult"])
    model = models.build_model(model_name, **fields)
    x, labels, augment = inputs(cfg)
    apply = jax.jit(lambda v, x, s, y, a: model.apply(v, x, s, y, augment_labels=a))
    ours = np.asarray(apply(variables, x, SIGMAS, labels, None))
    ref = torch_denoise(net, cfg, x, labels)
    c_skip = 0.25 / (SIGMAS**2 + 0.25)
    assert np.abs(ref - c_skip[:, None, None, None] * x).max() > 0.3  # the network's part counts
    print(f"{name}: max |D_flax - D_torch| = {np.abs(ours - ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)
    if augment is not None:  # the official augmentation conditioning, when given
        ours = np.asarray(apply(variables, x, SIGMAS, labels, augment))
        np.testing.assert_allclose(ours, torch_denoise(net, cfg, x, labels, augment), rtol=0, atol=TOLERANCE)


def test_command_writes_a_bundle_that_loads_samples_and_matches(pickles, tmp_path, capsys):
    path, net = pickles["ncsnpp_cond"]
    cfg = CONFIGS["ncsnpp_cond"]
    edm_import.main([f"--pkl={path}", f"--out={tmp_path / 'teacher'}"])
    assert "Wrote" in capsys.readouterr().out
    model, variables, meta = bundles.load_model(tmp_path / "teacher", "teacher")
    assert meta["model"] == "edm_songunet" and meta["network"] == "ema"
    assert meta["official"] == {"class_name": "EDMPrecond", "model_type": "SongUNet", "sigma_min": 0.0,
                                "sigma_max": None, "use_fp16": False}
    assert model.KIND == "denoiser" and model.spec == models.DenoiserSpec(8, 3, 4, 0.5)
    assert (model.embedding_type, model.encoder_type, tuple(model.resample_filter)) == ("fourier", "residual",
                                                                                          (1, 3, 3, 1))
    x, labels, _ = inputs(cfg, seed=1)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, SIGMAS, labels)),
                               torch_denoise(net, cfg, x, labels), rtol=0, atol=TOLERANCE)
    # Heun (EDM's deterministic sampler) over the imported denoiser: 3 steps, 5 evaluations.
    denoise = lambda x, s: model.apply(variables, x, s, jnp.asarray(labels[:2]))
    images, nfe = jax.jit(lambda key: diffusion_samplers.sample(denoise, key, (2, 8, 8, 3), "heun",
                                                                diffusion_samplers.edm_sigmas(3)))(jax.random.key(0))
    assert images.shape == (2, 8, 8, 3) and int(nfe) == 5 and bool(jnp.all(jnp.isfinite(images)))


def test_interface_dropout_and_consistency_parameterisation(pickles):
    model_name, fields, variables, _ = ei.convert_network(load_network_pickle(pickles["adm_uncond"][0])["ema"])
    model = models.build_model(model_name, **fields)
    assert models.kind(model_name) == "denoiser" and model_name in models.names_of_kind("denoiser")
    x, _, _ = inputs(CONFIGS["adm_uncond"])
    run = jax.jit(lambda v, key: model.apply(v, x, SIGMAS, train=True, rngs={"dropout": key}))
    a, b = run(variables, jax.random.key(0)), run(variables, jax.random.key(1))
    assert fields["dropout"] == 0.13 and not np.allclose(a, b)  # dropout draws from the 'dropout' stream
    consistency = model.clone(parameterisation="consistency", sigma_min=0.002)
    np.testing.assert_array_equal(np.asarray(consistency.apply(variables, x, 0.002)), x)  # f(x; sigma_min) = x
    with pytest.raises(ValueError, match="encoder_type='skipp'"):
        models.build_model("edm_songunet", encoder_type="skipp").check()
    with pytest.raises(ValueError, match="model_channels=24"):  # a GroupNorm over 144 = 72 + 72 channels: 32 groups
        models.build_model("edm_dhariwalunet", model_channels=24, channel_mult=(1, 3)).check()


def _set_init(**changes):
    return lambda net, tmp: net._init_kwargs.update(changes)


def _replace_weight(net, tmp):
    net.model.map_layer0.weight = torch.nn.Parameter(torch.zeros(7, 5))


def _extra_and_missing(net, tmp):
    net.model.enc["8x8_block0"].register_buffer("mystery", torch.zeros(3))
    del net.model.dec["8x8_aux_conv"]._parameters["bias"]


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _unsafe(net, tmp):
    net.model.evil = _Payload(os.system, f"touch {tmp / 'pwned'}")


BAD = {  # name -> (config, mutation of the torch network before pickling or of the file, expected message)
    "truncated": ("ddpmpp_uncond", "truncate", "truncated|corrupt"),
    "not_a_pickle": ("ddpmpp_uncond", "text", "corrupt|not a network pickle"),
    "vp_precond": (dict(CONFIGS["ddpmpp_uncond"], class_name="VPPrecond"), None, "VPPrecond.*baseline"),
    "unknown_option": ("ddpmpp_uncond", _set_init(bogus_option=3), "Unsupported official option.*bogus_option"),
    "bad_value": ("ddpmpp_uncond", _set_init(encoder_type="fancy"), "encoder_type='fancy'"),
    "bad_type": ("adm_uncond", _set_init(num_blocks="1"), "num_blocks='1'"),
    "settings_disagree_with_weights": ("adm_uncond", _set_init(model_channels=64), "does not match its settings"),
    "settings_ask_for_more_than_the_file": ("adm_uncond", _set_init(num_blocks=32), "holds .* tensors, fewer than"),
    "wrong_shape": ("ddpmpp_uncond", _replace_weight, r"map_layer0\.weight: \(5, 7\) vs expected"),
    "extra_and_missing": ("ddpmpp_uncond", _extra_and_missing, r"8x8_block0\.mystery.*8x8_aux_conv\.bias"),
    "unsafe_global": ("ddpmpp_uncond", _unsafe, r"posix\.system"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pickles_end_in_one_clear_error(tmp_path, capsys, case):
    cfg, mutate, message = BAD[case]
    cfg = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    path = tmp_path / "bad.pkl"
    write_pickle(path, cfg, mutate=(lambda net: mutate(net, tmp_path)) if callable(mutate) else None)
    if mutate == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif mutate == "text":
        path.write_text("img_resolution: 32\nmodel_type: SongUNet\n")
    with pytest.raises(SystemExit) as exit_info:
        edm_import.main([f"--pkl={path}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("kdjax: error:") and err.count("\n") == 1, err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


MODULE_DICT = b"ctorch.nn.modules.container\nModuleDict\n)\x81"  # GLOBAL, EMPTY_TUPLE, NEWOBJ


@pytest.mark.parametrize("body, error", [
    (MODULE_DICT + b"}b", None),                              # NEWOBJ, BUILD({}): loads
    (MODULE_DICT + b"}b}b", "one dict state only"),           # a second BUILD
    (MODULE_DICT, "without its state"),                       # no BUILD
    (MODULE_DICT + b"K\x01b", "one dict state only"),         # BUILD(1)
    (b"ctorch.nn.modules.container\nSequential\n)\x81}b", r"torch\.nn\.modules\.container\.Sequential"),
])
def test_module_dict_is_the_one_torch_class_allowed_and_is_built_once(tmp_path, body, error):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"\x80\x02}X\x03\x00\x00\x00ema" + body + b"s.")   # {'ema': body}
    if error is None:
        ema = load_network_pickle(path)["ema"]
        assert isinstance(ema, ei.PersistentObject) and ema["class_name"] == "ModuleDict" and ema["state"] == {}
    else:
        with pytest.raises(ei.NetworkPickleError, match=error):
            load_network_pickle(path)


def test_mutated_edm_pickles_load_or_fail_cleanly(pickles):
    """Random byte flips, insertions and truncations of a real-layout EDM pickle (with its ModuleDicts): each loads
    or raises NetworkPickleError, never another exception (the long fuzzing of the shared pieces is
    test_safe_pickle.py's)."""
    data = pickles["song_skip_uncond"][0].read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(len(mutated)))
            kind = rng.integers(3)
            if kind == 0:
                mutated[i] = int(rng.integers(256))
            elif kind == 1:
                mutated[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8))
            else:
                del mutated[i:]
        try:
            load_network_pickle(io.BytesIO(bytes(mutated)))
            outcomes["loaded"] += 1
        except ei.NetworkPickleError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes


def test_an_imported_teacher_distils(tmp_path):
    """An imported official network (DDPM++, 8x8x1, unconditional) is a diffusion_distill teacher: the tiny
    progressive run makes its 2- and 1-step students of the same network; the one-step U-Net generator, which wraps
    kdjax's own U-Net, is refused for it with a clear error before any compute."""
    from kdjax import train
    from kdjax.tasks import diffusion_distill

    write_pickle(tmp_path / "teacher.pkl", dict(CONFIGS["ddpmpp_uncond"], img_channels=1))
    ei.import_pickle(tmp_path / "teacher.pkl", tmp_path / "teacher")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = train.load_config(os.path.join(root, "configs", "diffusion_distill.py") + ":tiny")
    config.teacher.bundle, config.async_checkpoints = str(tmp_path / "teacher"), False
    diffusion_distill.check_config(config)
    out = train.train_and_evaluate(config, tmp_path / "run")
    students = [(r["sampler"], r["nfe"], r["params"]) for r in out["rows"] if r["model"] == "progressive"]
    assert students == [("progressive 2-step", 2, out["teacher_params"]), ("progressive 1-step", 1,
                                                                           out["teacher_params"])]
    assert bundles.load_model(tmp_path / "run" / "stage1" / "bundle")[2]["model"] == "edm_songunet"
    config.method = "dmd"
    with pytest.raises(ValueError, match=re.escape("config.dmd.generator.model='edm_one_step' wraps an edm_unet; "
                                                   "the teacher is an 'edm_songunet'")):
        diffusion_distill.check_config(config)
