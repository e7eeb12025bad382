"""Knowledge distillation for image restoration: x2 super-resolution of the scikit-image photographs (RGB), an
EDSR teacher (64 features x 8 blocks) into a thin EDSR student (16 x 8), scored by PSNR/SSIM on held-out
photographs.

    python launch.py --config=configs/restoration_kd.py
    python launch.py --config=configs/restoration_kd.py:tiny          # seconds; what the tests run
    python launch.py --config=configs/restoration_kd.py:x4            # x4 super-resolution
    python launch.py --config=configs/restoration_kd.py:inpaint       # free-form (stroke) inpainting, U-Nets
    python launch.py --config=configs/restoration_kd.py:denoise       # Gaussian noise, sigma 25, U-Nets
    python launch.py --config=configs/restoration_kd.py:data.train_pool=0   # fresh pairs, the teacher at every step

Phases (`kdjax/tasks/restoration_kd.py`): the teacher (the shipped bundles `kdjax/pretrained/photos/edsr_x2`,
`unet_inpaint`, `unet_denoise`, or trained here when `teacher.checkpoint` is "", as `:teacher` and `:x4` do), the
student with KD (`kdjax/steps/restoration.py`: alpha * L1 to the ground truth + (1 - alpha) * L1 to the teacher's
output + w_feat * adapted feature MSE + w_fakd * FAKD over `kd.pairs` [+ w_adv * adversarial]), the same student
from scratch (L1 to the ground truth); then `report.md` (test and validation photographs) and `crops.png`.

The settings were chosen on the validation photographs with validation seed 100. alpha = 0 and the feature terms on
an ESPCN student (64, 32): KD student PSNR 41.441 dB with alpha 0, 41.417 with alpha 0.5 and the feature terms,
41.435 with alpha 0.5 without them; scratch 41.381; a wider (96, 48) ESPCN 41.445 at twice the FLOPs was not worth
it. Those figures are on the first validation set, 2 photographs of the training side (hubble_deep_field,
microaneurysms), mostly flat and dark: bicubic reaches 39.6 dB on them, and the three KD students sat within 0.06
dB. With scikit-learn's two photographs added (`data.extra_validation`; bicubic 32.89, the teacher 34.57 dB), the
student was chosen again among those at >= 10x fewer FLOPs than the teacher, KD validation PSNR: EDSR 16 x 8 34.191
dB (101.2 MFLOPs per 64x64 output, 15.2x fewer), ESPCN (64, 32) 34.167 (53.4), EDSR 24 x 4 34.154 (140.6). The thin
EDSR is the default. It trains 6000 steps on a fixed pool of 8000 training pairs (`data.train_pool`), the teacher's
outputs on them computed once (about a minute) instead of at every step, without the feature terms; the scratch
student trains as many steps on the same pool. Chosen on validation seed 100 (against the config before:
`python -m kdjax.sweep --config=configs/restoration_kd.py --seeds=1 --seed_offset=100 --setting
pool=data.train_pool=8000,student.train.num_steps=6000 --setting pool_nofeat=data.train_pool=8000,
student.train.num_steps=6000,kd.w_feat=0.0,kd.w_fakd=0.0,kd.pairs=`, one argument each): KD validation PSNR 34.413 dB
without the feature terms, 34.327 with them (w_feat 0.01 and w_fakd 0.2 on the body4 and body maps, the recipe
before), the scratch student 34.327 in both. On fresh pairs, the teacher run at every step, the same KD student had
reached 34.19 at 2000 steps and 34.24 at 4000 (3000 was the default then, at 12.5 minutes a run). Without the
feature terms a pooled KD step costs about a scratch step (17 steps/s against 7 with them; both sharing the cores
with another run). w_fakd = 0.2, which `:inpaint` and `:denoise` use, is the official FAKD setting (weight 10 on
the sum over 3 maps of L1 images in [0, 255]) rescaled to this code's images in [-1, 1] and its mean over maps:
10 * 3 / 127.5. Figures over 3 seeds and run times: README, "Image restoration".
`:inpaint` and `:denoise` keep the recipe before (fresh pairs, the feature terms, 2000 steps) with U-Nets, not
re-chosen for them (alone on the idle cores, seed 0: `:inpaint` 5.3 minutes, `:denoise` 5.7).
"""

import ml_collections

from kdjax.config import (PHOTOS_EDSR_X2, PHOTOS_UNET_DENOISE, PHOTOS_UNET_INPAINT, apply_arg, degradation_config,
                          optimizer_config, phase_train_config, photos_data_config, run_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("restoration_kd", log_every=100, checkpoint_every=500)
    # 3 of the 17 photographs held out (coins, rocket, text), 2 of the rest set aside for validation
    # (hubble_deep_field, microaneurysms) and scikit-learn's two photographs (china, flower) added to it; evaluated
    # on centre crops of at most 256 pixels.
    config.data = photos_data_config(source="skimage", channels=3, crop=48, test_fraction=0.2,
                                     validation_fraction=0.15, extra_validation="sklearn", eval_max_side=256)
    # 0: each student step draws fresh crops and runs the teacher on them. N > 0: both students train on one fixed
    # pool of N pairs, with the teacher's outputs on it computed once before training (a KD step then costs about
    # a scratch step; the pool's memory is checked before any compute). 8000 pairs: the validation run below.
    config.data.train_pool = 8000
    config.degradation = degradation_config("downsample", scale=2)  # sets the models' scale (and extra_inputs)
    config.teacher = ml_collections.ConfigDict(dict(
        model="edsr",
        kwargs=ml_collections.ConfigDict(dict(num_features=64, num_blocks=8)),
        # The shipped x2 teacher (kdjax/pretrained/README.md: how it was made); "" trains one here with `train`.
        checkpoint=str(PHOTOS_EDSR_X2),
        train=phase_train_config(2000, 16, name="adam", learning_rate=5e-4, schedule="cosine"),
    ))
    config.student = ml_collections.ConfigDict(dict(  # a thin EDSR: 15.2x fewer FLOPs than the teacher
        model="edsr",
        kwargs=ml_collections.ConfigDict(dict(num_features=16, num_blocks=8)),
        # 6000 steps on the pool (module docstring); :inpaint and :denoise train 2000 on fresh pairs
        train=phase_train_config(6000, 16, name="adam", learning_rate=1e-3, schedule="cosine"),
    ))
    config.kd = ml_collections.ConfigDict(dict(
        alpha=0.0,  # weight of L1 to the ground truth (1 - alpha: L1 to the teacher's output); chosen on validation
        # The feature terms, off for x2 (chosen on validation, module docstring); :inpaint and :denoise use them.
        w_feat=0.0,  # adapted feature matching (MSE after learned 1x1 adapters) over `pairs`; 0 = off
        w_fakd=0.0,  # FAKD (L1 between spatial affinity matrices) over `pairs`; 0 = off
        pairs="",  # student:teacher feature maps of the same size, e.g. "body4:body4,body:body" ("" = none)
        # The optional adversarial term (SRGAN-style; 0 = off): a discriminator judging the central 32 x 32
        # window (the largest power of two <= the crop) of ground truth (real) and the student's output (fake).
        w_adv=0.0,
        adv_loss="logistic",  # "logistic" (non-saturating) or "hinge"
        discriminator=ml_collections.ConfigDict(dict(
            model="dcgan_discriminator", kwargs=ml_collections.ConfigDict(dict(width=32, width_max=128)))),
        d_optimizer=optimizer_config("adam", 1e-4, b1=0.9, b2=0.999),
    ))
    return apply_arg(config, arg, VARIANTS, where="configs/restoration_kd.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: grey 16-pixel crops at x2, a tiny EDSR and ESPCN, 10 steps per phase, 2 test
    photographs (coins, text) evaluated on 32 x 32 centre crops; seconds end to end."""
    config.data.update(dict(channels=1, crop=16, test_fraction=0.1, eval_max_side=32, num_threads=1))
    config.teacher.checkpoint = ""  # a tiny grey teacher, trained in the run
    config.teacher.kwargs.update(dict(num_features=8, num_blocks=2))
    config.student.model = "espcn"
    config.student.kwargs = ml_collections.ConfigDict(dict(features=(8, 4), activation="tanh"))
    config.data.train_pool = 0  # fresh pairs (a pooled tiny run: data.train_pool=64)
    config.kd.update(dict(w_feat=0.01, w_fakd=0.2, pairs="hidden1:body1,hidden2:body"))  # every term exercised
    config.kd.discriminator.kwargs.update(dict(width=8, width_max=16))
    for block in (config.teacher, config.student):
        block.train.num_steps = 10
        block.train.optimizer.learning_rate = 3e-3
    config.log_every = config.checkpoint_every = 5


def teacher(config: ml_collections.ConfigDict) -> None:
    """The run that trains a shipped teacher: `:teacher` the x2 EDSR (`kdjax/pretrained/photos/edsr_x2`),
    `:inpaint,teacher` and `:denoise,teacher` the U-Nets; 6000 teacher steps, and 1 step for each student, as only
    the teacher is kept (`workdir/teacher/bundle`)."""
    config.teacher.checkpoint = ""
    config.teacher.train.num_steps = 6000
    config.student.train.num_steps = 1
    config.data.train_pool = 0


def x4(config: ml_collections.ConfigDict) -> None:
    """x4 super-resolution (12 x 12 inputs of the 48 x 48 crops); no shipped x4 teacher: one is trained here."""
    config.degradation.scale = 4
    config.teacher.checkpoint = ""


def unets(config: ml_collections.ConfigDict, shipped_teacher: str) -> None:
    """Scale-1 restoration with U-Nets: the shipped (32, 64, 128) teacher, an (8, 16, 32) student (15x fewer
    FLOPs), their half- and quarter-resolution maps paired (the full-resolution dec0 would make 2304 x 2304
    affinity matrices)."""
    config.teacher.model = config.student.model = "unet"
    config.teacher.checkpoint = shipped_teacher  # `:NAME,teacher` trains one here instead
    config.teacher.kwargs = ml_collections.ConfigDict(dict(widths=(32, 64, 128)))
    config.student.kwargs = ml_collections.ConfigDict(dict(widths=(8, 16, 32)))
    config.kd.update(dict(w_feat=0.01, w_fakd=0.2, pairs="dec1:dec1,bottleneck:bottleneck"))
    config.data.train_pool = 0  # fresh pairs: the inputs' masks and noise drawn anew at every step
    config.student.train.num_steps = 2000  # the recipe their README figures were measured with


def inpaint(config: ml_collections.ConfigDict) -> None:
    """Free-form inpainting: DeepFill v2-style strokes (input = masked image + mask channel), U-Nets; the shipped
    teacher `kdjax/pretrained/photos/unet_inpaint`."""
    config.degradation = degradation_config("stroke_inpainting")
    unets(config, str(PHOTOS_UNET_INPAINT))


def denoise(config: ml_collections.ConfigDict) -> None:
    """Denoising: additive Gaussian noise of sigma 25 grey levels, U-Nets; the shipped teacher
    `kdjax/pretrained/photos/unet_denoise`."""
    config.degradation = degradation_config("noise", sigma=25.0)
    unets(config, str(PHOTOS_UNET_DENOISE))


VARIANTS = {"tiny": tiny, "teacher": teacher, "x4": x4, "inpaint": inpaint, "denoise": denoise}
