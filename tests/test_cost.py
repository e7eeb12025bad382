"""kdjax.cost: what XLA's cost analysis counts (exactly), parameter counts, timing and the command."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kdjax import cost as cost_cli
from kdjax.evaluation import cost, sizing
from kdjax.models import build_model, dcgan

# 'rbg' keys: XLA:CPU compiles threefry random draws slowly (a small D's jitted init took 8.9 s to
# compile with threefry, 1.3 s with rbg); the parameter values do not matter here.
RNGS = {"params": jax.random.key(0, impl="rbg")}


def _conv_flops(x_shape, k, cout, padding, bias):
    m = nn.Conv(cout, (k, k), padding=padding, use_bias=bias)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    v = jax.eval_shape(m.init, RNGS, x)
    return cost.flops_per_image(m.apply, v, x, batch_size=x_shape[0])


def _in_bounds_taps(n, k):
    """Per axis, the number of (output, tap) pairs of a stride-1 'SAME' conv that read real input."""
    lo = (k - 1) // 2
    return sum(1 for o in range(n) for t in range(k) if 0 <= o + t - lo < n)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_flops_are_textbook(bias):
    b, din, dout = 4, 16, 8
    m = nn.Dense(dout, use_bias=bias)
    x = jax.ShapeDtypeStruct((b, din), jnp.float32)
    v = jax.eval_shape(m.init, RNGS, x)
    # 2 FLOPs per multiply-add; the bias adds 1 per output.
    assert cost.flops_per_image(m.apply, v, x, batch_size=b) == 2 * din * dout + (dout if bias else 0)


def test_conv_flops_are_textbook_for_valid_padding():
    h, w, k, cin, cout = 8, 10, 3, 3, 5
    ho, wo = h - k + 1, w - k + 1
    assert _conv_flops((2, h, w, cin), k, cout, "VALID", False) == 2 * ho * wo * k * k * cin * cout
    assert (_conv_flops((2, h, w, cin), k, cout, "VALID", True)
            == 2 * ho * wo * k * k * cin * cout + ho * wo * cout)


def test_same_conv_flops_skip_the_zero_padding():
    """XLA does not count taps on the padding: fewer than the 2*H*W*k*k*Cin*Cout formula."""
    h, w, k, cin, cout = 8, 10, 3, 3, 5
    textbook = 2 * h * w * k * k * cin * cout
    exact = 2 * _in_bounds_taps(h, k) * _in_bounds_taps(w, k) * cin * cout
    assert exact < textbook
    assert _conv_flops((2, h, w, cin), k, cout, "SAME", False) == exact


def test_transcendentals_are_not_flops():
    x = jax.ShapeDtypeStruct((4, 100), jnp.float32)
    assert cost.flops_per_image(jnp.tanh, x, batch_size=4) == 0.0
    assert cost.flops_per_image(lambda a: a * 2.0, x, batch_size=4) == 100.0


def test_cost_analysis_list_form_is_accepted():
    class Old:  # jax < 0.4.30 returned a list with one dict per program
        def cost_analysis(self):
            return [{"flops": 12.0}]

    assert cost._cost_dict(Old())["flops"] == 12.0


def test_count_params_by_hand():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)  # 3*3*2*4 + 4 = 76
            x = nn.BatchNorm(use_running_average=True)(x)  # scale + bias = 8 (mean/var not counted)
            return nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1))  # 6*6*4*5 = 720

    x = jnp.zeros((1, 6, 6, 2))
    variables = Net().init(RNGS, x)
    assert set(variables) == {"params", "batch_stats"}
    assert cost.count_params(variables) == 76 + 8 + 720
    assert cost.count_params(variables["params"]) == 76 + 8 + 720
    assert cost.count_params(jax.eval_shape(Net().init, RNGS, x)) == 76 + 8 + 720


def test_count_params_default_dcgan_generator_by_hand():
    g = dcgan.Generator()  # z 128; stages 4, 8, 16, 32 with 128, 96, 48, 24 channels
    assert g.stage_channels() == {4: 128, 8: 96, 16: 48, 32: 24}
    expected = (128 * 16 * 128 + 2 * 128  # dense (no bias) + bn4 (scale, bias)
                + 9 * 128 * 4 * 96 + 2 * 96  # sub-pixel 3x3 conv to 4x channels (no bias) + bn8
                + 9 * 96 * 4 * 48 + 2 * 48
                + 9 * 48 * 4 * 24 + 2 * 24
                + 9 * 24 * 3 + 3)  # to_rgb with bias
    v = jax.eval_shape(g.init, RNGS, jax.ShapeDtypeStruct((1, 128), jnp.float32))
    assert cost.count_params(v) == expected


def test_images_per_second_and_device_name():
    ips = cost.images_per_second(lambda x: x @ x.T, lambda b: (jnp.ones((b, 32)),), batch_size=4,
                                 warmup=1, iters=3)
    assert ips > 0
    name = cost.device_name()
    assert isinstance(name, str) and name


def test_summary_and_command(capsys):
    s = cost.summary("dcgan_generator", batch_sizes=(2,), iters=1, resolution=16, width=8,
                     width_max=16)
    v = jax.eval_shape(dcgan.Generator(resolution=16, width=8, width_max=16).init, RNGS,
                       jax.ShapeDtypeStruct((1, 128), jnp.float32))
    assert s.params == cost.count_params(v) and s.flops_per_image > 0
    assert set(s.images_per_second) == {2} and s.images_per_second[2] > 0
    assert "img/s @2" in cost.format_table([s])
    cost_cli.main(["dcgan_discriminator", "resolution=16", "width=8", "num_classes=3", "--no-timing"])
    out = capsys.readouterr().out
    assert "dcgan_discriminator" in out and "MFLOPs/img" in out and "img/s" not in out
    with pytest.raises(ValueError, match="no field"):
        cost.summary("dcgan_generator", timed=False, widht=8)


def test_example_inputs_labels_only_for_conditional_generators_and_discriminators():
    clf = build_model("cnn", num_classes=10)  # a classifier's num_classes is its output size
    args, kw = cost.example_inputs("cnn", clf, 2, input_shape=(8, 8, 3))
    assert [a.shape for a in args] == [(2, 8, 8, 3)] and kw == {"train": False}
    gen = build_model("stylegan2_generator", z_dim=7, c_dim=4)
    args, _ = cost.example_inputs("stylegan2_generator", gen, 3)
    assert [a.shape for a in args] == [(3, 7), (3,)] and int(args[1].max()) < 4
    disc = build_model("stylegan2_discriminator", img_resolution=16, img_channels=1, c_dim=0)
    args, _ = cost.example_inputs("stylegan2_discriminator", disc, 2)
    assert [a.shape for a in args] == [(2, 16, 16, 1)]
    disc = build_model("dcgan_discriminator", resolution=16, img_channels=3, num_classes=5)
    args, _ = cost.example_inputs("dcgan_discriminator", disc, 2)
    assert [a.shape for a in args] == [(2, 16, 16, 3), (2,)]
    with pytest.raises(ValueError, match="input_shape"):
        cost.example_inputs("cnn", clf, 2)


def test_widest_under_budget_picks_the_last_width_that_fits():
    """The chosen width fits the FLOPs budget and the next wider one does not (counts made here, one by one)."""
    teacher = dict(z_dim=32, w_dim=32, img_resolution=16, img_channels=1, channel_base=512, channel_max=32,
                   mapping_layers=2)
    student = dict(z_dim=32, resolution=16, img_channels=1, width_max=64)
    widths = (4, 8, 16, 32)
    kwargs, ratio = sizing.widest_under_budget("stylegan2_generator", teacher, widths=widths, budget=0.25, **student)
    t_flops = cost.summary("stylegan2_generator", timed=False, **teacher).flops_per_image
    flops = {w: cost.summary("dcgan_generator", timed=False, width=w, **student).flops_per_image for w in widths}
    fits = [w for w in widths if flops[w] <= 0.25 * t_flops]
    assert fits and fits[-1] != widths[-1], (flops, t_flops)  # the case must discriminate
    assert kwargs == {**student, "width": fits[-1]}
    assert ratio == pytest.approx(flops[fits[-1]] / t_flops)
    with pytest.raises(ValueError, match="narrowest"):
        sizing.widest_under_budget("stylegan2_generator", teacher, widths=widths, budget=1e-6, **student)
