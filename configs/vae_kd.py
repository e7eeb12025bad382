"""A VAE teacher distilled into a TAESD-style tiny decoder and tiny encoder, on the scikit-image photographs
(RGB, 32-pixel training crops, factor 4, 4 latent channels), scored by reconstruction PSNR/SSIM on held-out
photographs.

    python launch.py --config=configs/vae_kd.py
    python launch.py --config=configs/vae_kd.py:tiny           # seconds; what the tests run
    python launch.py --config=configs/vae_kd.py:teacher        # trains the shipped VAE (only the teacher is kept)
    python launch.py --config=configs/vae_kd.py:digits         # 32x32 digits, test split
    python launch.py --config=configs/vae_kd.py:vq             # a VQ-VAE teacher (256 codes), trained in the run
    python launch.py --config=configs/vae_kd.py:kd.w_target=0.5   # KD decoder also pulled to the real crop

Phases (`kdjax/tasks/vae_kd.py`): the VAE teacher (the shipped bundle `kdjax/pretrained/photos/vae`, or trained here
with `kdjax/steps/vae.py`, L1 reconstruction + beta * KL, when `teacher.checkpoint` is ""), the tiny decoder
distilled on the teacher's latents (w_teacher * L1 to the teacher decoder's image + w_target * L1 to the real
crop), the same decoder from scratch (L1 to the real crop), the tiny encoder (MSE to the teacher's posterior
mean); then `report.md` and `crops.png`. Nothing is tuned yet: the budgets, learning rates and beta are first
guesses. The crops are 32 pixels (with 64, the default run was estimated at 3.5 hours on the project's loaded
2-core CPU); the networks are fully convolutional and are evaluated on whole photographs (centre crops of at most
256 pixels). The default run with the shipped VAE took 8.1-8.3 minutes on the project's idle 2 CPU cores (1500
steps for each tiny half, the report); over 3 seeds the KD decoder beats the scratch one on every seed (README).
"""

import ml_collections

from kdjax.config import (DIGITS32_JUDGE, PHOTOS_VAE, apply_arg, data_config, optimizer_config, phase_train_config,
                          photos_data_config, run_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("vae_kd", log_every=100, checkpoint_every=500)
    # 3 of the 17 photographs held out, 2 of the rest set aside for validation (the same split as
    # configs/restoration_kd.py); evaluated on centre crops of at most 256 pixels.
    config.data = photos_data_config(source="skimage", channels=3, crop=32, test_fraction=0.2,
                                     validation_fraction=0.15, eval_max_side=256)
    config.teacher = ml_collections.ConfigDict(dict(
        model="vae",
        # widths per level (factor 2^(levels - 1) = 4), latent channels, GroupNorm groups
        kwargs=ml_collections.ConfigDict(dict(widths=(64, 128, 128), latent_channels=4, res_blocks=1,
                                              norm_groups=8)),
        # The shipped VAE (kdjax/pretrained/README.md: how it was made); "" trains one here with `train`.
        checkpoint=str(PHOTOS_VAE),
        # weight of the KL term (per latent dimension) against the reconstruction (per pixel); the tiny decoder
        # soft-clamps latents to (-3, 3) as TAESD does, so a larger beta keeps them nearer that range. With a
        # quantised latent (kwargs.num_codes > 0, :vq) the commitment term's weight instead.
        beta=1e-3,
        recon="l1",  # "l1" | "l2": the reconstruction term
        vq_decay=0.99,  # the codebook's EMA decay (quantised latent only)
        train=phase_train_config(2000, 16, name="adam", learning_rate=1e-3, schedule="cosine"),
    ))
    # latent_channels and factor come from the teacher, channels from the data.
    # The tiny halves' width: 20 is the widest that keeps both >= 10x cheaper than the teacher's halves (per 64x64
    # image: decoder 181 against 2360 MFLOPs, encoder 154 against 1699; 22 leaves the encoder at 9.1x).
    config.tiny_decoder = ml_collections.ConfigDict(dict(
        model="tiny_decoder",
        kwargs=ml_collections.ConfigDict(dict(features=20, blocks=2)),
        train=phase_train_config(1500, 16, name="adam", learning_rate=1e-3, schedule="cosine"),
    ))
    config.tiny_encoder = ml_collections.ConfigDict(dict(
        model="tiny_encoder",
        kwargs=ml_collections.ConfigDict(dict(features=20, blocks=2)),
        train=phase_train_config(1500, 16, name="adam", learning_rate=1e-3, schedule="cosine"),
    ))
    config.kd = ml_collections.ConfigDict(dict(
        w_teacher=1.0,  # L1 to the teacher decoder's image of the same latent (TAESD's target)
        w_target=0.0,  # L1 to the real crop
        # TAESD's perceptual term (0 = off): the perceptual distance between a judge's feature maps of the tiny
        # decoder's image and the teacher decoder's; `judge` a classifier bundle taking the training images (the
        # digits judge for :digits; none exists for photographs here)
        w_perceptual=0.0,
        judge="",
        # TAESD's adversarial term (0 = off): a discriminator on the central window (the largest power of two <=
        # the crop) of the real crops (real) and the tiny decoder's images (fake); the kd phase only
        w_adv=0.0,
        adv_loss="logistic",  # "logistic" (non-saturating) or "hinge"
        discriminator=ml_collections.ConfigDict(dict(
            model="dcgan_discriminator", kwargs=ml_collections.ConfigDict(dict(width=32, width_max=128)))),
        d_optimizer=optimizer_config("adam", 1e-4, b1=0.9, b2=0.999),
    ))
    return apply_arg(config, arg, VARIANTS, where="configs/vae_kd.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: grey 16-pixel crops, factor 4, a tiny VAE (no residual blocks but the middle ones) and
    tiny halves (one Block each), 8 steps per phase, 2 test photographs (coins, text) evaluated on 32 x 32 centre
    crops; seconds end to end (compiling is most of it)."""
    if "crop" in config.data:  # photographs (after `digits`, the digits at 16 x 16)
        config.data.update(dict(channels=1, crop=16, test_fraction=0.1, eval_max_side=32))
    else:
        config.data.resolution = 16
    config.teacher.kwargs.update(dict(widths=(8, 8, 16), latent_channels=2, res_blocks=0, norm_groups=4))
    for role in ("tiny_decoder", "tiny_encoder"):
        config[role].kwargs.update(dict(features=8, blocks=0))
    config.kd.discriminator.kwargs.update(dict(width=8, width_max=16))
    for block in (config.teacher, config.tiny_decoder, config.tiny_encoder):
        block.train.num_steps = 8
        block.train.batch_size = 8
        block.train.optimizer.learning_rate = 3e-3
    config.log_every = config.checkpoint_every = 8
    config.teacher.checkpoint = ""  # a tiny grey VAE, trained in the run


def teacher(config: ml_collections.ConfigDict) -> None:
    """The run that trains the shipped VAE (`kdjax/pretrained/photos/vae`): 4000 teacher steps, and 1 step for
    each tiny half, as only the teacher is kept (`workdir/teacher/bundle`)."""
    config.teacher.checkpoint = ""
    config.teacher.train.num_steps = 4000
    for role in ("tiny_decoder", "tiny_encoder"):
        config[role].train.num_steps = 1


def digits(config: ml_collections.ConfigDict) -> None:
    """scikit-learn's digits at 32 x 32 (grey), factor 4: the VAE and the tiny halves on the training split,
    scored on the 359 test images (a tenth of the training images for validation)."""
    config.data = data_config(source="digits", resolution=32, channels=1, validation_fraction=0.1)
    config.teacher.checkpoint = ""  # no shipped digits VAE: one is trained here
    config.teacher.kwargs.update(dict(widths=(32, 64, 64)))
    config.teacher.train.update(dict(num_steps=3000, batch_size=64))
    for role in ("tiny_decoder", "tiny_encoder"):
        config[role].kwargs.update(dict(features=16, blocks=2))
        config[role].train.update(dict(num_steps=2000, batch_size=64))
    config.kd.judge = str(DIGITS32_JUDGE)  # for the perceptual term (kd.w_perceptual > 0)


def vq(config: ml_collections.ConfigDict) -> None:
    """A vector-quantised teacher (VQ-VAE: 256 codes of latent_channels dimensions, commitment weight 0.25, the
    codebook by EMA), trained in the run (no VQ teacher is shipped); the tiny halves read and predict its quantised
    latents."""
    config.teacher.checkpoint = ""
    config.teacher.kwargs.num_codes = 256
    config.teacher.beta = 0.25
    if config.teacher.kwargs.widths == (8, 8, 16):  # after `tiny`: a small codebook
        config.teacher.kwargs.num_codes = 16


VARIANTS = {"tiny": tiny, "teacher": teacher, "digits": digits, "vq": vq}
