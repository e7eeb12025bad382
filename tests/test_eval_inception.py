"""The Flax FID InceptionV3 and its weights loader, against an independent torch build of the same network.

The torch reference below is written from torchvision's Inception3 and pytorch-fid's FID patches (NCHW,
torch's own padding and pooling), and named as pytorch-fid's state dict; a random state dict from it plays
the weights file that cannot be downloaded here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.evaluation import inception

torch = pytest.importorskip("torch")
F = torch.nn.functional


class _Conv(torch.nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # the FID patch: padding excluded from the average
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(torch.nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class _B(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _C(torch.nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class _D(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _E(torch.nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class _TorchFIDInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c = _C(768, 128), _C(768, 160)
        self.Mixed_6d, self.Mixed_6e = _C(768, 160), _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
        self.fc = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        feats = x.mean(dim=(2, 3))
        return feats, self.fc(feats)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = _TorchFIDInception().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so every tensor matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.6)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _state_dict_numpy(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_eval_shape_gives_2048_features():
    model = inception.InceptionV3()
    shapes = inception.variable_shapes(model)
    for size, channels in ((299, 3), (32, 3), (8, 1)):  # 8 x 8 grayscale: the digits dataset
        x = jax.ShapeDtypeStruct((5, size, size, channels), jnp.float32)
        assert jax.eval_shape(model.apply, shapes, x).shape == (5, 2048)
    feats, logits = jax.eval_shape(lambda v, x: model.apply(v, x, return_logits=True), shapes,
                                   jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)


def test_names_and_shapes_match_the_torch_state_dict(torch_model):
    sd = _state_dict_numpy(torch_model)
    weights = {k: v.shape for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(weights) == 472  # 94 conv+BN blocks x 5 tensors + fc weight and bias
    names = inception.torch_names()
    assert set(names) == set(weights)
    for name, (_, flax_shape) in names.items():
        torch_shape = weights[name]
        if len(torch_shape) == 4:
            torch_shape = (torch_shape[2], torch_shape[3], torch_shape[1], torch_shape[0])
        elif len(torch_shape) == 2:
            torch_shape = torch_shape[::-1]
        assert flax_shape == torch_shape, name


def test_loaded_weights_reproduce_the_torch_forward_pass(torch_model, tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(torch_model.state_dict(), path)
    variables = inception.load_inception_variables(path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 139, 139, 3)).astype(np.float32)  # 3 x 3 at Mixed_7c
    with torch.no_grad():
        want_feats, want_logits = (t.numpy() for t in torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2))))
    model = inception.InceptionV3(resize_input=False)
    feats, logits = jax.jit(lambda v, x: model.apply(v, x, return_logits=True))(variables, x)
    scale = np.abs(want_feats).max()
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(feats), want_feats, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-5 * np.abs(want_logits).max(), rtol=0)

    # The same weights as .npz load to the same variables.
    npz = tmp_path / "inception.npz"
    np.savez(npz, **_state_dict_numpy(torch_model))
    again = inception.load_inception_variables(npz)
    jax.tree.map(np.testing.assert_array_equal, variables, again)


def test_bilinear_resize_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    for size in (32, 400):  # up- and down-sampling
        x = rng.uniform(-1, 1, (1, size, size + 3, 2)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                             align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = jax.image.resize(x, (1, 299, 299, 2), "bilinear", antialias=False)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_loader_names_missing_extra_and_misshaped_keys(torch_model):
    sd = _state_dict_numpy(torch_model)
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
    with pytest.raises(ValueError) as err:
        inception.convert_state_dict(sd)
    message = str(err.value)
    for name in ("Mixed_6c.branch7x7dbl_3.bn.running_var", "AuxLogits.fc.weight",
                 "Mixed_7c.branch_pool.conv.weight"):
        assert name in message
    with pytest.raises(ValueError, match="format"):
        inception.load_state_dict("weights.ckpt")
