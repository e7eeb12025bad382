"""TFLite export (jax2tf + TFLiteConverter, builtin ops only) run back in LiteRT's interpreter: equal to Flax
for a class-conditional DCGAN generator, a StyleGAN2 generator (constant noise) and a classifier, at batch
1 and 8 (one dynamic-batch file resized between calls); the metadata travels in the flatbuffer."""

import pytest
from export_helpers import check_parity, write_bundles

from kdjax import deploy
from kdjax.deploy import tf_formats


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return write_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.mark.parametrize("name", ["dcgan", "classifier"])
def test_dynamic_batch_matches_flax(bundles, tmp_path, name):
    out = tmp_path / f"{name}.tflite"
    deploy.export_bundle(str(bundles[name]), "tflite", str(out))
    runner = deploy.load(out)
    assert runner.interpreter.get_input_details()[0]["shape_signature"][0] == -1  # a dynamic batch
    check_parity(runner, name, bundles[name], batches=(1, 8, 3))


def test_stylegan2_at_fixed_batches(bundles, tmp_path):
    for batch in (1, 8):
        out = tmp_path / f"g{batch}.tflite"
        deploy.export_bundle(str(bundles["stylegan2"]), "tflite", str(out), batch)
        check_parity(deploy.load(out), "stylegan2", bundles["stylegan2"], batches=(batch,))


def test_stylegan2_dynamic_batch_is_one_clear_error(bundles, tmp_path):
    # Under a symbolic batch ws[:, i] becomes a dynamic gather, which the TFLite converter cannot lower.
    with pytest.raises(deploy.ExportError, match="TFLite converter cannot convert.*--batch=N"):
        deploy.export_bundle(str(bundles["stylegan2"]), "tflite", str(tmp_path / "g.tflite"))
    assert list(tmp_path.iterdir()) == []


def test_metadata_round_trip(bundles, tmp_path):
    out = tmp_path / "d.tflite"
    deploy.export_bundle(str(bundles["dcgan"]), "tflite", str(out), 4)
    meta = tf_formats.read_tflite_metadata(out.read_bytes())
    assert meta["model"] == "dcgan_generator" and meta["batch"] == 4 and meta["format"] == "tflite"
    assert [t["name"] for t in meta["inputs"]] == ["z", "labels"]
    assert meta["inputs"][1] == {"name": "labels", "shape": [4], "dtype": "int32",
                                 "meaning": "class label in [0, 3)"}
