"""The DCGAN student trained from scratch on real data: the baseline that shows what distillation is worth.

    python launch.py --config=configs/dcgan_scratch.py
    python launch.py --config=configs/dcgan_scratch.py:tiny     # seconds; what the tests run

Same student architecture as the distillation job; non-saturating logistic loss with lazy R1, Adam
(0.0, 0.99) as in StyleGAN2's recipe, an EMA of the generator. The generator (EMA) is exported to
WORKDIR/generator/bundle.
"""

import ml_collections

from kdjax.config import apply_arg, data_config, gan_config, optimizer_config, phase_train_config, run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("gan", log_every=100, checkpoint_every=1000)
    config.data = data_config(source="digits", resolution=32, channels=1)
    config.generator = ml_collections.ConfigDict(dict(
        model="dcgan_generator", kwargs=ml_collections.ConfigDict(dict(z_dim=128, width=24, width_max=128))))
    config.discriminator = ml_collections.ConfigDict(dict(
        model="dcgan_discriminator", kwargs=ml_collections.ConfigDict(dict(width=32, width_max=128))))
    config.gan = gan_config(r1_gamma=0.1, ema_decay=0.999,
                            train=phase_train_config(5000, 64, name="adam", learning_rate=2e-3, b1=0.0, b2=0.99),
                            d_optimizer=optimizer_config("adam", 2e-3, b1=0.0, b2=0.99))
    return apply_arg(config, arg, {"tiny": tiny}, where="configs/dcgan_scratch.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: seconds."""
    config.data.resolution = 16
    config.generator.kwargs.update(dict(z_dim=16, width=8, width_max=16))
    config.discriminator.kwargs.update(dict(width=8, width_max=16))
    config.gan.train.num_steps, config.gan.train.batch_size = 12, 16
    config.gan.r1_every = 4
    config.log_every = config.checkpoint_every = 6
