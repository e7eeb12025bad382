"""ONNX export (jax2onnx) run back in onnxruntime: equal to Flax for a class-conditional DCGAN generator, a
StyleGAN2 generator (constant noise) and a classifier, at batch 1 and 8; the metadata travels in the file."""

import json

import onnx
import pytest
from export_helpers import check_parity, write_bundles

from kdjax import deploy


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return write_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.mark.parametrize("name", ["dcgan", "classifier"])
def test_dynamic_batch_matches_flax(bundles, tmp_path, name):
    out = tmp_path / f"{name}.onnx"
    deploy.export_bundle(str(bundles[name]), "onnx", str(out))
    graph_input = onnx.load(str(out)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a symbolic batch, not a number
    check_parity(deploy.load(out), name, bundles[name])


def test_stylegan2_at_fixed_batches(bundles, tmp_path):
    for batch in (1, 8):
        out = tmp_path / f"g{batch}.onnx"
        deploy.export_bundle(str(bundles["stylegan2"]), "onnx", str(out), batch)
        check_parity(deploy.load(out), "stylegan2", bundles["stylegan2"], batches=(batch,))


def test_stylegan2_dynamic_batch_is_one_clear_error(bundles, tmp_path):
    # jax2onnx 0.13.0 cannot lower lax.pad (upfirdn2d's padding) with a symbolic batch.
    with pytest.raises(deploy.ExportError, match="dynamic batch.*--batch=N"):
        deploy.export_bundle(str(bundles["stylegan2"]), "onnx", str(tmp_path / "g.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_transpose_upsampling(tmp_path):
    bundle = write_bundles(tmp_path / "b", upsample="transpose")["dcgan"]
    deploy.export_bundle(str(bundle), "onnx", str(tmp_path / "t.onnx"))
    check_parity(deploy.load(tmp_path / "t.onnx"), "dcgan", bundle)


def test_metadata(bundles, tmp_path):
    out = tmp_path / "c.onnx"
    deploy.export_bundle(str(bundles["classifier"]), "onnx", str(out))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    meta = json.loads(props["kdjax"])
    assert meta["model"] == "cnn" and meta["kind"] == "classifier" and meta["batch"] == "dynamic"
    assert meta["inputs"] == [{"name": "images", "shape": [None, 16, 16, 1], "dtype": "float32",
                               "meaning": "NHWC float32 in [-1, 1]"}]
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["shape"] == [None, 10]
    assert meta["converter"].startswith("jax2onnx ") and meta["kdjax_version"]
    assert deploy.load(out).metadata == meta
