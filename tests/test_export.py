"""`python -m kdjax.export` and `kdjax.deploy`: StableHLO and SavedModel exports equal Flax (dynamic batch, 1
and 8 rows) for a class-conditional DCGAN generator, a StyleGAN2 generator (constant noise) and a
classifier; bad arguments are one clear error before any compute; a failed or interrupted export leaves
nothing at --out (and an existing one intact)."""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from export_helpers import check_parity, write_bundles

from kdjax import deploy
from kdjax.deploy import atomic, stablehlo

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return write_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.mark.parametrize("name", ["dcgan", "stylegan2", "classifier"])
def test_stablehlo_matches_flax(bundles, tmp_path, name):
    out = tmp_path / f"{name}.jaxexport"
    summary = deploy.export_bundle(str(bundles[name]), "stablehlo", str(out))
    assert set(summary["max_abs_error"]) == {1, 8}
    runner = deploy.load(out)
    assert runner.exported.platforms == ("cpu", "cuda", "tpu")
    assert str(runner.exported.in_avals[0].shape[0]) == "batch"  # symbolic
    check_parity(runner, name, bundles[name], batches=(1, 8, 5))
    with zipfile.ZipFile(out) as archive:
        assert json.loads(archive.read("metadata.json"))["model"] == runner.metadata["model"]


@pytest.mark.parametrize("name", ["dcgan", "stylegan2", "classifier"])
def test_savedmodel_matches_flax(bundles, tmp_path, name):
    out = tmp_path / name
    deploy.export_bundle(str(bundles[name]), "savedmodel", str(out))
    assert (out / "saved_model.pb").is_file()
    runner = deploy.load(out)
    assert runner.metadata["format"] == "savedmodel"
    check_parity(runner, name, bundles[name])


def test_stablehlo_fixed_batch_and_truncation(bundles, tmp_path):
    out = tmp_path / "g.jaxexport"
    deploy.export_bundle(str(bundles["stylegan2"]), "stablehlo", str(out), 2, truncation_psi=0.5)
    runner = deploy.load(out)
    assert runner.metadata["options"] == {"noise_mode": "const", "truncation_psi": 0.5}
    from kdjax.models.bundles import load_model

    model, variables, _ = load_model(bundles["stylegan2"])
    z = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    want = np.asarray(model.apply(variables, z, noise_mode="const", truncation_psi=0.5))
    np.testing.assert_allclose(runner(z), want, atol=1e-6)
    with pytest.raises(ValueError, match="Shape mismatch"):  # a fixed batch refuses another
        runner(np.zeros((3, 16), np.float32))


def test_autoregressive_model(tmp_path):
    """A class-conditional PixelCNN: images and labels in, per-pixel level logits out, equal to Flax."""
    from kdjax.models import build_model
    from kdjax.models.bundles import save_model_bundle

    kwargs = dict(resolution=4, channels=1, levels=5, num_classes=3, features=4, layers=2, kernel_size=3)
    model = build_model("pixelcnn", **kwargs)
    variables = model.init(jax.random.key(0), np.zeros((1, 4, 4, 1), np.float32), np.zeros((1,), np.int32))
    save_model_bundle(tmp_path / "b", "pixelcnn", kwargs, variables)
    out = tmp_path / "p.jaxexport"
    deploy.export_bundle(str(tmp_path / "b"), "stablehlo", str(out))
    runner = deploy.load(out)
    assert [t["name"] for t in runner.metadata["inputs"]] == ["images", "labels"]
    assert runner.metadata["outputs"][0]["shape"] == [None, 4, 4, 1, 5]
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 2, 1], np.int32)
    np.testing.assert_allclose(runner(x, y), np.asarray(model.apply(variables, x, y)), atol=1e-6)


def test_autoencoder_exports_its_decoder(tmp_path):
    """A VQ-VAE bundle exports the half a prior's samples need: integer codes in, decoded images out."""
    from kdjax.models import build_model
    from kdjax.models.bundles import save_model_bundle

    kwargs = dict(resolution=8, channels=1, num_codes=6, code_dim=3, features=8, downsamples=1, res_blocks=1)
    model = build_model("vqvae", **kwargs)
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    save_model_bundle(tmp_path / "b", "vqvae", kwargs, variables)
    out = tmp_path / "d.jaxexport"
    deploy.export_bundle(str(tmp_path / "b"), "stablehlo", str(out))
    runner = deploy.load(out)
    assert [(t["name"], t["dtype"]) for t in runner.metadata["inputs"]] == [("codes", "int32")]
    assert runner.metadata["outputs"][0]["shape"] == [None, 8, 8, 1]
    codes = np.random.default_rng(0).integers(0, 6, (3, 4, 4)).astype(np.int32)
    want = np.asarray(model.apply(variables, codes, method=type(model).decode_codes))
    np.testing.assert_allclose(runner(codes), want, atol=1e-6)


def test_image_to_image_network_at_a_given_input_shape(tmp_path):
    """An x2 super-resolution network: the input shape is the caller's (fully convolutional), output 2x."""
    from kdjax.models import build_model
    from kdjax.models.bundles import save_model_bundle

    kwargs = dict(channels=1, scale=2, features=(8, 4))
    model = build_model("espcn", **kwargs)
    variables = model.init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))
    save_model_bundle(tmp_path / "b", "espcn", kwargs, variables)
    with pytest.raises(deploy.ExportError, match="records no input_shape; pass --input_shape"):
        deploy.export_bundle(str(tmp_path / "b"), "stablehlo", str(tmp_path / "x.jaxexport"))
    out = tmp_path / "sr.jaxexport"
    deploy.export_bundle(str(tmp_path / "b"), "stablehlo", str(out), input_shape=(12, 10, 1))
    runner = deploy.load(out)
    assert runner.metadata["outputs"][0]["shape"] == [None, 24, 20, 1]
    x = np.random.default_rng(0).uniform(-1, 1, (3, 12, 10, 1)).astype(np.float32)
    np.testing.assert_allclose(runner(x), np.asarray(model.apply(variables, x)), atol=1e-6)


def test_signature_inputs(bundles):
    sig = deploy.signatures.from_bundle(str(bundles["dcgan"]))
    assert [(t.name, t.shape, t.dtype) for t in sig.inputs] == [("z", (16,), "float32"), ("labels", (), "int32")]
    assert (sig.output.name, sig.output.shape) == ("images", (16, 16, 1))
    sig = deploy.signatures.from_bundle(str(bundles["classifier"]), input_shape=(8, 8, 1))
    assert sig.inputs[0].shape == (8, 8, 1)  # the caller's shape wins over the bundle's


# ---- bad input: one clear error, before any compute -------------------------------------------------

def bad(match, *args, **kwargs):
    with pytest.raises(deploy.ExportError, match=match):
        deploy.export_bundle(*args, **kwargs)


def test_bad_arguments(bundles, tmp_path):
    g = str(bundles["dcgan"])
    bad("'pt' is not an export format; valid: stablehlo, onnx, savedmodel, tflite", g, "pt", str(tmp_path / "x"))
    bad("--batch='0' is neither", g, "stablehlo", str(tmp_path / "x.jaxexport"), "0")
    bad("--batch='many' is neither", g, "stablehlo", str(tmp_path / "x.jaxexport"), "many")
    bad("a onnx export is a .onnx file", g, "onnx", str(tmp_path / "x.tflite"))
    bad("is not an existing directory", str(tmp_path / "nope"), "stablehlo", str(tmp_path / "x.jaxexport"))
    bad("truncation_psi=0.5: the Generator generator has no truncation", g, "stablehlo",
        str(tmp_path / "x.jaxexport"), truncation_psi=0.5)
    bad("--truncation_psi is for generators", str(bundles["classifier"]), "stablehlo",
        str(tmp_path / "x.jaxexport"), truncation_psi=0.5)
    garbage = tmp_path / "garbage"
    (garbage / "variables").mkdir(parents=True)
    (garbage / "model.json").write_text("{not json")
    bad("unreadable .*model.json", str(garbage), "stablehlo", str(tmp_path / "x.jaxexport"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage"]


def test_classifier_without_input_shape(bundles, tmp_path):
    bundle = tmp_path / "judge"
    import shutil

    shutil.copytree(bundles["classifier"], bundle)
    meta = json.loads((bundle / "model.json").read_text())
    del meta["input_shape"]
    (bundle / "model.json").write_text(json.dumps(meta))
    bad("records no input_shape; pass --input_shape=H,W,C", str(bundle), "stablehlo", str(tmp_path / "c.jaxexport"))
    deploy.export_bundle(str(bundle), "stablehlo", str(tmp_path / "c.jaxexport"), input_shape=(16, 16, 1))


def test_missing_optional_package_names_the_extra(bundles, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax2onnx" else real(name, *a))
    bad(r"--format=onnx needs jax2onnx, not installed; install the export extra: pip install -e '.\[export\]'",
        str(bundles["dcgan"]), "onnx", str(tmp_path / "x.onnx"))


def test_existing_output_needs_overwrite(bundles, tmp_path):
    out = tmp_path / "g.jaxexport"
    out.write_bytes(b"keep me")
    bad("already exists; pass --overwrite", str(bundles["dcgan"]), "stablehlo", str(out))
    assert out.read_bytes() == b"keep me"
    deploy.export_bundle(str(bundles["dcgan"]), "stablehlo", str(out), overwrite=True)
    assert zipfile.is_zipfile(out)


# ---- atomic output ---------------------------------------------------------------------------------

def test_interrupted_export_leaves_nothing(bundles, tmp_path, monkeypatch):
    real_write = stablehlo.write

    def write_then_interrupt(sig, batch, path, metadata):
        real_write(sig, batch, path, metadata)
        path.write_bytes(path.read_bytes()[:100])  # a half-written file
        raise KeyboardInterrupt

    monkeypatch.setitem(deploy.FORMATS, "stablehlo",
                        deploy.FORMATS["stablehlo"].__class__(**{**deploy.FORMATS["stablehlo"].__dict__,
                                                                 "write": write_then_interrupt}))
    out = tmp_path / "g.jaxexport"
    with pytest.raises(KeyboardInterrupt):
        deploy.export_bundle(str(bundles["dcgan"]), "stablehlo", str(out))
    assert list(tmp_path.iterdir()) == []  # no file at --out, no staging directory left


def test_failed_parity_check_keeps_the_old_export(bundles, tmp_path, monkeypatch):
    out = tmp_path / "c"
    deploy.export_bundle(str(bundles["classifier"]), "savedmodel", str(out))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    spec = deploy.FORMATS["savedmodel"]

    def wrong_runner(path):
        runner = spec.runner(path)
        return lambda *arrays: runner(*arrays) + 1e-2

    monkeypatch.setitem(deploy.FORMATS, "savedmodel", spec.__class__(**{**spec.__dict__, "runner": wrong_runner}))
    bad("does not reproduce JAX: max .* = 0.01 on 1 rows", str(bundles["classifier"]), "savedmodel", str(out),
        overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_directory_replaced_whole(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic.staged(atomic.check_output(out, overwrite=True)) as target:
        target.mkdir()
        (target / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---- the command -----------------------------------------------------------------------------------

def run_cli(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "kdjax.export", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli(bundles, tmp_path):
    out = tmp_path / "g.jaxexport"
    ok = run_cli(f"--bundle={bundles['dcgan']}", "--format=stablehlo", f"--out={out}", "--batch=8")
    assert ok.returncode == 0, ok.stderr
    assert f"Wrote {out}" in ok.stdout and "max |exported - JAX| = 0 at batch 8" in ok.stdout
    again = run_cli(f"--bundle={bundles['dcgan']}", "--format=onnx", f"--out={out}")
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"kdjax: error: --out={str(out)!r} already exists; pass --overwrite to "
                                         "replace it, or another --out."]
    shape = run_cli(f"--bundle={bundles['classifier']}", "--format=stablehlo", f"--out={tmp_path / 'c.jaxexport'}",
                    "--input_shape=16,16")
    assert shape.returncode == 2 and shape.stderr.splitlines() == [
        "kdjax: error: --input_shape='16,16' is not H,W,C (three positive integers, e.g. 32,32,1)."]
