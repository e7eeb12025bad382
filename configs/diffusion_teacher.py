"""Train an EDM diffusion teacher (a small preconditioned U-Net, Karras et al. 2022) on any dataset kdjax reads
(default: the embedded digits at 32x32, 1 channel), and report its samplers against the number of network
evaluations (NFE).

    python launch.py --config=configs/diffusion_teacher.py
    python launch.py --config=configs/diffusion_teacher.py:tiny   # seconds; what the tests run
    python launch.py --config=configs/diffusion_teacher.py:conditional   # class-conditional (digits' labels)
    python launch.py --config=configs/diffusion_teacher.py --config.data.source=tfds --config.data.name=cifar10 \
        --config.data.channels=3 --config.compute_dtype=bfloat16

EDM's loss (ln sigma ~ N(-1.2, 1.2^2), weight (sigma^2 + s_d^2) / (sigma s_d)^2), Adam with a warm-up and cosine
decay, an EMA of the parameters (decay 0.999), exported to WORKDIR/denoiser/bundle. The report (WORKDIR/report.md)
gives, for Heun, Euler and DDIM at 1, 2, 4, 8 and 16 steps, the NFE, FLOPs and images/s per generated image and the
FID/KID of 1000 samples in the shipped digits judge's features, plus samples.png and fid_vs_nfe.png.

The defaults are the recipe of the shipped digits teacher (`kdjax/pretrained/digits32/diffusion`; its exact
commands and figures in `kdjax/pretrained/README.md`): a U-Net of widths 32/64/64, 1 block per level, attention at
8x8, dropout 0.1 (1,112,801 parameters), 5000 steps at batch 32, about 1 hour on the project's idle 2-core CPU
(1.5 steps/s). The report's sampling costs 119 evaluations per sample over its 15 settings.
"""

import ml_collections

from kdjax.config import DIGITS32_JUDGE, apply_arg, data_config, phase_train_config, run_config, sample_eval_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("diffusion_teacher", log_every=250, checkpoint_every=500, eval_batch_size=256)
    config.data = data_config(source="digits", resolution=32, channels=1)
    config.conditional = False  # condition the denoiser on the dataset's labels
    config.denoiser = ml_collections.ConfigDict(dict(
        model="edm_unet",
        # resolution, channels and num_classes come from the data.
        kwargs=ml_collections.ConfigDict(dict(widths=(32, 64, 64), num_blocks=1, attention_resolutions=(8,),
                                              dropout=0.1, sigma_data=0.5)),
        train=phase_train_config(5000, 32, name="adam", learning_rate=5e-4, schedule="warmup_cosine",
                                 warmup_steps=500),
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        p_mean=-1.2,  # ln sigma ~ N(p_mean, p_std^2) in training (EDM)
        p_std=1.2,
        ema_decay=0.999,  # of the parameters, per step; the EMA is the exported teacher
    ))
    config.sampler = ml_collections.ConfigDict(dict(
        methods=("heun", "euler", "ddim"),  # kdjax.models.diffusion_samplers.SAMPLERS
        steps=(1, 2, 4, 8, 16),  # step counts N of every method in the report (Heun: 2N - 1 NFE)
        sigma_min=0.002,  # EDM's noise levels for Heun and Euler (DDIM uses DDPM's)
        sigma_max=80.0,
        rho=7.0,
        preview_steps=18,  # Heun steps of the samples written at every log step
    ))
    config.eval = sample_eval_config(judge=str(DIGITS32_JUDGE), num_samples=1000)
    return apply_arg(config, arg, VARIANTS, where="configs/diffusion_teacher.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: seconds end to end. One U-Net level (XLA:CPU compile time grows with the levels), and
    plain SGD and no dropout (its draws are per device) so that the tests can compare 8 devices with 1 on this very
    step."""
    config.data.resolution = 8
    config.denoiser.kwargs.update(dict(widths=(8,), num_blocks=1, attention_resolutions=(), dropout=0.0))
    config.denoiser.train = phase_train_config(6, 16, name="sgd", learning_rate=0.05)
    config.sampler.methods = ("heun", "euler")
    config.sampler.steps = (1, 2)
    config.sampler.preview_steps = 2
    config.eval.judge = ""  # the shipped judge scores 32x32 digits (tests give a tiny judge)
    config.eval.num_samples = 16
    config.log_every = config.checkpoint_every = 3
    config.eval_batch_size = 16


def conditional(config: ml_collections.ConfigDict) -> None:
    """Class-conditional: the denoiser takes the digit's label (a learned embedding)."""
    config.conditional = True


VARIANTS = {"tiny": tiny, "conditional": conditional}
