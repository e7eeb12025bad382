"""Distil the shipped digits diffusion teacher (an EDM U-Net, `kdjax/pretrained/digits32/diffusion`) into few-step
and one-step students, and report FID/KID against NFE next to the teacher's own sampler (task `diffusion_distill`).

    python launch.py --config=configs/diffusion_distill.py                 # progressive, 16 -> 8 -> 4 -> 2 -> 1 steps
    python launch.py --config=configs/diffusion_distill.py:consistency     # consistency distillation, 1 and 2 steps
    python launch.py --config=configs/diffusion_distill.py:dmd             # DMD2 into a one-step generator
    python launch.py --config=configs/diffusion_distill.py:curve           # progressive, the teacher at 1 to 16 steps
    python launch.py --config=configs/diffusion_distill.py:tiny --config.teacher.bundle=DIR   # seconds (the tests)

Every method's student is the teacher's network, started from the teacher's weights, as in each paper: progressive
distillation halves the Euler steps stage by stage (each stage's student teaches the next); consistency
distillation learns the consistency function of the teacher's Heun ODE steps; DMD2 makes the network a one-step
generator G(z) = D(80 z; 80) and trains it, data-free, along the difference of the teacher and a fake denoiser of
its own samples. The report's rows: the teacher with Heun at `sampler.teacher_steps` (16 steps, 31 evaluations
per sample, the FID reference; `:curve` adds 1, 2, 4 and 8), then the students; FID and KID against all the real
digits and against the teacher's 16-step samples, in the shipped judge's features.

The training settings are starting points sized for this CPU, not tuned. Progressive distillation trains its 8-
and 4-step students 200 steps each, its 2- and 1-step ones 100 and 140 (`progressive.stage_fractions`). Run
times on the project's 2-core CPU with the machine otherwise idle: the default run 18.7 min (seed 0 of
`python -m kdjax.sweep --config=configs/diffusion_distill.py --seeds=3`, timed by the sweep from the run's start):
12.1 of training (640 steps), 4.1 for the judge's real features and the teacher's 16-step row, 2.2 for the
students' rows.
`:curve` adds 3.3 min for the teacher's 1- to 8-step rows (measured when every stage trained 200 steps).
`:consistency` 17.5 min (seed 1), `:dmd` 14.3 min (seed 0). DMD2's GAN term
(`dmd.gan.generator_weight=3e-3`) raised the one-step FID on validation seed 100 from 8.62 to 12.69, so it stays
off. Figures: README, "Diffusion".
"""

import ml_collections

from kdjax.config import (DIGITS32_DIFFUSION, DIGITS32_JUDGE, apply_arg, data_config, phase_train_config, run_config,
                          sample_eval_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("diffusion_distill", log_every=50, checkpoint_every=250, eval_batch_size=250)
    config.data = data_config(source="digits", resolution=32, channels=1)
    config.teacher = ml_collections.ConfigDict(dict(
        bundle=str(DIGITS32_DIFFUSION),  # an edm_unet denoiser bundle (configs/diffusion_teacher.py exports one)
    ))
    config.method = "progressive"  # "progressive", "consistency" or "dmd"
    config.sampler = ml_collections.ConfigDict(dict(
        sigma_min=0.002,  # EDM's noise range and schedule, for the teacher and every student
        sigma_max=80.0,
        rho=7.0,
        # the teacher's Heun rows (2N - 1 NFE); the last is the FID reference. Its whole curve, (1, 2, 4, 8, 16), is
        # `:curve` (3.3 more minutes).
        teacher_steps=(16,),
    ))
    config.progressive = ml_collections.ConfigDict(dict(
        base_steps=16,  # the teacher's Euler steps in stage 1 (its grid: EDM's 16-step levels)
        final_steps=1,  # the last stage's student steps
        dropout=0.0,  # the student's (the teacher's network's) dropout while training
        ema_decay=0.0,  # of each stage's student; 0 = its parameters
        train=phase_train_config(200, 32, name="adam", learning_rate=1e-4),  # per stage, times its fraction:
        # each stage's share of train.num_steps, base stage first (() = all of them for every stage). The 8- and
        # 4-step students' stages get all; the 2- and 1-step ones' less, to fit the run in 20 minutes (the 2-step
        # stage's loss flattens sooner than the 1-step one's).
        stage_fractions=(1.0, 1.0, 0.5, 0.7),
    ))
    config.consistency = ml_collections.ConfigDict(dict(
        num_levels=18,  # K EDM levels sigma_max ... sigma_min the teacher's Heun steps join
        distance="pseudo_huber",  # "l2" or "pseudo_huber" (kdjax.losses.CONSISTENCY_DISTANCES)
        target_decay=0.95,  # the target network's EMA decay mu (the CM paper's CD on CIFAR-10)
        dropout=0.0,
        mid_sigmas=(0.8,),  # the multistep sampler's re-noising levels after sigma_max
        sample_steps=(1, 2),  # the report's rows: 1 step, and 1 + k steps through mid_sigmas[:k]
        train=phase_train_config(600, 32, name="adam", learning_rate=1e-4),
    ))
    config.dmd = ml_collections.ConfigDict(dict(
        # the one-step student: "edm_one_step" (the teacher's network and weights, G(z) = D(sigma_max z; sigma_max),
        # no kwargs) or any generator model from its own initialisation (e.g. dcgan_generator: diffusion_to_dcgan.py)
        generator=ml_collections.ConfigDict(dict(model="edm_one_step", kwargs=ml_collections.ConfigDict())),
        fake_updates_per_step=2,  # fake-denoiser updates per generator update (DMD2 uses 5)
        fake_learning_rate=5e-5,  # the fake denoiser's Adam learning rate (the generator's is train's)
        train=phase_train_config(500, 16, name="adam", learning_rate=5e-5),
        # DMD2's GAN term on the training images (a realism head on the fake denoiser's middle map); DMD2's weights
        # are 3e-3 and 1e-2. generator_weight 0: no GAN term, the step is data-free.
        gan=ml_collections.ConfigDict(dict(generator_weight=0.0, classifier_weight=1e-2)),
    ))
    config.eval = sample_eval_config(judge=str(DIGITS32_JUDGE), num_samples=1000)
    return apply_arg(config, arg, VARIANTS, where="configs/diffusion_distill.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size (give a tiny teacher at 8x8: --config.teacher.bundle): seconds per method."""
    config.data.resolution = 8
    config.sampler.teacher_steps = (1, 2)
    config.progressive.base_steps = 4
    config.progressive.stage_fractions = ()
    config.consistency.num_levels = 4
    config.consistency.mid_sigmas = (0.5,)
    for block in (config.progressive, config.consistency, config.dmd):
        block.train = phase_train_config(4, 16, name="sgd", learning_rate=0.01)
    config.dmd.fake_updates_per_step = 1
    config.eval.judge = ""
    config.eval.num_samples = 16
    config.log_every = config.checkpoint_every = 2
    config.eval_batch_size = 16


def consistency(config: ml_collections.ConfigDict) -> None:
    """Consistency distillation (Song et al. 2023). The teacher's reference row only (its most steps), whatever
    came before; `:consistency,curve` for its whole curve."""
    config.method = "consistency"
    config.sampler.teacher_steps = tuple(config.sampler.teacher_steps)[-1:]


def dmd(config: ml_collections.ConfigDict) -> None:
    """One-step distribution-matching distillation (DMD2, Yin et al. 2024). The teacher's reference row only, as
    for `consistency`."""
    config.method = "dmd"
    config.sampler.teacher_steps = tuple(config.sampler.teacher_steps)[-1:]


def progressive(config: ml_collections.ConfigDict) -> None:
    """Progressive distillation (Salimans & Ho 2022): the default."""
    config.method = "progressive"


def curve(config: ml_collections.ConfigDict) -> None:
    """The teacher's whole Heun curve, 1 to 16 steps (1, 3, 7, 15 and 31 NFE), as the report's teacher rows."""
    config.sampler.teacher_steps = (1, 2, 4, 8, 16)


VARIANTS = {"tiny": tiny, "consistency": consistency, "dmd": dmd, "progressive": progressive, "curve": curve}
