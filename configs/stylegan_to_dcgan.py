"""The main job: distill a StyleGAN2 teacher into a DCGAN student, train the same student from scratch, and
report both against the teacher.

    python launch.py --config=configs/stylegan_to_dcgan.py
    python launch.py --config=configs/stylegan_to_dcgan.py:distill.d_real_data=False  # data-free: D sees no real data
    python launch.py --config=configs/stylegan_to_dcgan.py --config.teacher.checkpoint=runs/my_teacher/generator/bundle \
        --config.judge.checkpoint=runs/my_judge/teacher/bundle --config.data.source=folder --config.data.folder=IMAGES

The default teacher and judge are the digits bundles shipped in `kdjax/pretrained/digits32/` (how they
were made: that folder's README). The workdir receives report.md / report.json, the PNGs (samples side by
side, learning and loss curves, spectra) and TensorBoard events; see `kdjax/tasks/distill.py`. The default
command took 8 min 54 s on the project's 2-core CPU (README, Results, with the figures it produced over 3
seeds). `:tiny` is the test size; `:FIELD=VALUE,...` sets fields (`kdjax.config.args`).
"""

import ml_collections

from kdjax.config import (DIGITS32_JUDGE, DIGITS32_TEACHER, DISTILL_TERMS, apply_arg, data_config, distill_config,
                          optimizer_config, phase_train_config, run_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("distill", log_every=50, checkpoint_every=250)
    config.data = data_config(source="digits", resolution=32, channels=1)  # real data: D (optional) and the report
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=str(DIGITS32_TEACHER)))  # a generator bundle
    config.judge = ml_collections.ConfigDict(dict(checkpoint=str(DIGITS32_JUDGE)))  # a classifier bundle
    # The student generator; its z_dim (or w_dim with reuse_mapping), resolution and channels come from the teacher.
    config.student = ml_collections.ConfigDict(dict(
        model="dcgan_generator", kwargs=ml_collections.ConfigDict(dict(width=24, width_max=128))))
    config.discriminator = ml_collections.ConfigDict(dict(  # for the adv term and the scratch baseline
        model="dcgan_discriminator", kwargs=ml_collections.ConfigDict(dict(width=32, width_max=128))))
    # D tells teacher images and real digits (real) from student images (fake); d_real_data=False makes the job
    # data-free (D sees teacher images only). Objective: recon_l1 1.0 + adv 0.1 with D on real data, chosen on
    # validation seeds 100-101 among data-free, D on real data, + kl 0.1 and + feature 0.5 (README, Results);
    # the judge's kl term doubled FID there. Turn a term on with e.g. `:kl=0.1` or
    # --config.distill.weights.kl.value=0.1 --config.distill.weights.kl.end_value=0.1.
    config.distill = distill_config(temperature=4.0, alpha=0.1, ema_decay=0.99, r1_gamma=0.1, d_real_data=True)
    w = config.distill.weights
    w.recon_l1.value = w.recon_l1.end_value = 1.0
    w.adv.value = w.adv.end_value = 0.1
    # The student's budget; the scratch baseline gets the same steps, batch and optimizers.
    config.train = phase_train_config(500, 64, name="adam", learning_rate=2e-3, b1=0.5, b2=0.99)
    config.d_optimizer = optimizer_config("adam", 2e-3, b1=0.0, b2=0.99)
    config.scratch = ml_collections.ConfigDict(dict(
        enabled=True,  # train the from-scratch baseline (a `gan` phase on real data)
        num_steps=0,  # its steps; 0 = the student's (config.train.num_steps)
        loss="logistic", r1_gamma=0.1, r1_every=16))
    config.eval = ml_collections.ConfigDict(dict(
        num_samples=2000,  # images per generator for FID/KID/PRDC and the fidelity metrics
        real_split="all",  # the real set scored against: "all" (every digit: the GAN protocol), "train", "test"
        teacher_samples=10_000,  # teacher samples of the second reference set ("vs teacher dist"; 0 = off)
        curve_every=100,  # steps between learning-curve points (FID/KID on curve_samples samples)
        curve_samples=500,
        timing_batch_sizes=(1, 64),  # images/s is measured at these batch sizes; the report quotes the last
    ))
    return apply_arg(config, arg, {"tiny": tiny}, ALIASES, where="configs/stylegan_to_dcgan.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """What the tests and notebooks run: needs --config.teacher/judge.checkpoint of 16x16 bundles
    (`kdjax.pretrained.tiny`)."""
    config.data.resolution = 16
    config.student.kwargs.update(dict(width=8, width_max=16))
    config.discriminator.kwargs.update(dict(width=8, width_max=16))
    config.train.num_steps, config.train.batch_size = 8, 16
    config.distill.r1_every = config.scratch.r1_every = 2
    config.log_every, config.checkpoint_every = 4, 4
    config.eval.num_samples, config.eval.timing_batch_sizes = 32, (8,)
    config.eval.teacher_samples, config.eval.curve_every, config.eval.curve_samples = 64, 4, 32
    config.eval_batch_size = 32


# `:TERM=W` sets a distillation term's constant weight (its value and end_value), e.g. `:adv=1.0,kl=0.1`.
ALIASES = {term: (f"distill.weights.{term}.value", f"distill.weights.{term}.end_value") for term in DISTILL_TERMS}
