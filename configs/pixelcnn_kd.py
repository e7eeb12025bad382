"""Knowledge distillation of an autoregressive model: a gated PixelCNN teacher -> a small PixelCNN student,
on the digits at their native 8x8 and 17 intensity levels, scored by exact held-out bits/dim.

    python launch.py --config=configs/pixelcnn_kd.py
    python launch.py --config=configs/pixelcnn_kd.py:tiny            # seconds; what the tests run
    python launch.py --config=configs/pixelcnn_kd.py:kd.alpha=0.5,kd.temperature=2

Phases (`kdjax/tasks/pixelcnn_kd.py`): the teacher (the shipped bundle, or trained here with
`--config.teacher.checkpoint=`), the student with word-level KD, with sequence-level KD on teacher samples
(`kd.sequence_samples`, 0 to skip), and the same student from scratch; then the report (`report.md`,
`samples.png`, FID/KID of 2000 samples per model in the shipped judge's features). The default run took
10 min 53 s on the project's 2-core CPU with another run beside it (5 min 54 s before the FID/KID evaluation
was added); results in the README. alpha, T and the student's optimizer were chosen on validation data.
"""

import ml_collections

from kdjax.config import (DIGITS8_PIXELCNN, DIGITS32_JUDGE, apply_arg, data_config, phase_train_config, run_config,
                          sample_eval_config, vqvae_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("pixelcnn_kd", log_every=100, checkpoint_every=500, eval_batch_size=128)
    config.data = data_config(source="digits", resolution=8, channels=1)
    config.levels = 17  # intensity levels per channel: the digits' 0..16 exactly (256 for 8-bit images)
    config.conditional = False  # condition every model on the class label
    config.teacher = ml_collections.ConfigDict(dict(
        model="pixelcnn",
        kwargs=ml_collections.ConfigDict(dict(features=48, layers=6, kernel_size=5)),
        # The shipped teacher (kdjax/pretrained/README.md); "" trains one here with `train` (how it was made).
        checkpoint=str(DIGITS8_PIXELCNN),
        train=phase_train_config(1000, 64, name="adamw", learning_rate=1e-3, schedule="cosine", weight_decay=1.0),
    ))
    config.student = ml_collections.ConfigDict(dict(
        model="pixelcnn",
        kwargs=ml_collections.ConfigDict(dict(features=16, layers=4, kernel_size=5)),
        train=phase_train_config(2000, 64, name="adam", learning_rate=2e-3, schedule="cosine"),
    ))
    config.kd = ml_collections.ConfigDict(dict(
        alpha=0.5,  # weight of the data's cross-entropy; 1 - alpha goes to the per-pixel soft (KL) term
        temperature=1.0,  # softmax temperature T of the soft term (scaled by T^2)
        sequence_samples=4000,  # > 0: also a sequence-level KD student trained on this many teacher samples
    ))
    config.vqvae = vqvae_config()  # none: the PixelCNNs model the pixels (configs/vqvae_prior_kd.py: VQ-VAE codes)
    # FID/KID of 2000 samples per model, scored as the main job scores its generators: in the shipped digits
    # judge's features at 32x32 (8x8 samples upsampled as the data path upsamples the real digits: bicubic).
    config.eval = sample_eval_config(judge=str(DIGITS32_JUDGE), num_samples=2000)
    return apply_arg(config, arg, VARIANTS, where="configs/pixelcnn_kd.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: seconds end to end (a teacher trained here: the shipped one is 8x8)."""
    config.teacher.checkpoint = ""
    config.data.resolution = 4
    config.levels = 5
    config.teacher.kwargs.update(dict(features=8, layers=2, kernel_size=3))
    config.student.kwargs.update(dict(features=4, layers=2, kernel_size=3))
    config.teacher.train.num_steps = config.student.train.num_steps = 20
    config.teacher.train.batch_size = config.student.train.batch_size = 32
    config.kd.sequence_samples = 64
    config.eval.judge = ""  # no FID: the shipped judge scores 32x32 digits (tests give a tiny judge)
    config.eval.num_samples = 16
    config.log_every = config.checkpoint_every = 10
    config.eval_batch_size = 64


VARIANTS = {"tiny": tiny}
