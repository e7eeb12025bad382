"""Train a StyleGAN2 teacher on any dataset (default: the embedded digits at 32x32, 1 channel).

    python launch.py --config=configs/stylegan_teacher.py
    python launch.py --config=configs/stylegan_teacher.py:tiny   # seconds; what the tests run
    python launch.py --config=configs/stylegan_teacher.py --config.data.source=tfds --config.data.name=cifar10 \
        --config.data.channels=3 --config.compute_dtype=bfloat16

Non-saturating logistic loss, lazy R1 (gamma, every 16 steps), style mixing (p = 0.9), an EMA of G, Adam
(0.0, 0.99): StyleGAN2's recipe. The EMA generator is exported to WORKDIR/generator/bundle, which
`configs/stylegan_to_dcgan.py` can name as its teacher. On this 2-core CPU a G+D step at batch 32 takes
about 2.1 s without R1, so a useful teacher wants a GPU/TPU or a long background run; the shipped digits
teacher's exact command and time are in `kdjax/pretrained/README.md`.
"""

import ml_collections

from kdjax.config import apply_arg, data_config, gan_config, run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("gan", log_every=100, checkpoint_every=1000)
    config.data = data_config(source="digits", resolution=32, channels=1)
    config.generator = ml_collections.ConfigDict(dict(
        model="stylegan2_generator",
        kwargs=ml_collections.ConfigDict(dict(z_dim=128, w_dim=128, channel_base=4096, channel_max=128,
                                              mapping_layers=8))))
    config.discriminator = ml_collections.ConfigDict(dict(
        model="stylegan2_discriminator",
        kwargs=ml_collections.ConfigDict(dict(channel_base=4096, channel_max=128))))
    # R1 gamma: a starting value, not tuned (StyleGAN2-ADA's heuristic 0.0002 * res^2 / batch gives 0.003 here).
    config.gan = gan_config(r1_gamma=0.05, style_mixing_prob=0.9)
    return apply_arg(config, arg, {"tiny": tiny}, where="configs/stylegan_teacher.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: seconds."""
    config.data.resolution = 16
    config.generator.kwargs.update(dict(z_dim=16, w_dim=16, channel_base=256, channel_max=16, mapping_layers=2))
    config.discriminator.kwargs.update(dict(channel_base=256, channel_max=16))
    config.gan.train.num_steps, config.gan.train.batch_size = 6, 32
    config.gan.r1_every = 2
    config.log_every = config.checkpoint_every = 3
