"""Knowledge distillation of a VQ-VAE prior: a VQ-VAE encodes 32x32 digits into an 8x8 grid of codes; a large
gated PixelCNN over those codes (the teacher prior) is distilled, with the per-code KL on temperature-softened
logits, into a small one; samples are drawn from each prior, decoded, and scored by FID/KID.

    python launch.py --config=configs/vqvae_prior_kd.py
    python launch.py --config=configs/vqvae_prior_kd.py:tiny          # seconds; what the tests run

The task is `pixelcnn_kd` (`kdjax/tasks/pixelcnn_kd.py`) with its VQ-VAE stage on
(`kdjax/tasks/vqvae_codes.py`): phase `vqvae` (trained here, or the bundle `vqvae.checkpoint`), the data
turned into codes, then the teacher prior, the student with per-code KD, and the student from scratch, as
for pixels. The report adds the VQ-VAE's reconstruction error and the FID/KID of its reconstructions (the
ceiling of any prior through this decoder). The default run (shipped VQ-VAE and teacher prior; two students,
2000 samples per model) took 6 to 9 minutes on the project's 2-core CPU, shared with other runs (371 to 525 s
over 3 seeds); results in the README. alpha, T and the teacher's step count were chosen on validation data.
"""

import ml_collections

from kdjax.config import (DIGITS32_JUDGE, DIGITS32_VQ_PRIOR, DIGITS32_VQVAE, apply_arg, data_config,
                          phase_train_config, run_config, sample_eval_config, vqvae_config)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("pixelcnn_kd", log_every=100, checkpoint_every=500, eval_batch_size=128)
    config.data = data_config(source="digits", resolution=32, channels=1)
    # The shipped VQ-VAE and teacher prior (kdjax/pretrained/README.md); with `checkpoint=""` each is trained
    # here from the fields below (how the shipped ones were made).
    config.vqvae = vqvae_config(
        "vqvae", num_codes=32, code_dim=16, features=64, downsamples=2, res_blocks=2,
        checkpoint=str(DIGITS32_VQVAE),
        train=phase_train_config(2000, 64, name="adam", learning_rate=1e-3, schedule="cosine"))
    config.levels = 32  # the priors' levels: the codebook size (vqvae.kwargs.num_codes)
    config.conditional = False
    config.teacher = ml_collections.ConfigDict(dict(
        model="pixelcnn",
        kwargs=ml_collections.ConfigDict(dict(features=48, layers=6, kernel_size=5, embed=16)),
        checkpoint=str(DIGITS32_VQ_PRIOR),  # "" trains the teacher prior here with `train`
        train=phase_train_config(2000, 64, name="adamw", learning_rate=1e-3, schedule="cosine", weight_decay=1.0),
    ))
    config.student = ml_collections.ConfigDict(dict(
        model="pixelcnn",
        kwargs=ml_collections.ConfigDict(dict(features=16, layers=4, kernel_size=5, embed=8)),
        train=phase_train_config(2000, 64, name="adam", learning_rate=2e-3, schedule="cosine"),
    ))
    config.kd = ml_collections.ConfigDict(dict(
        alpha=0.5,  # weight of the codes' cross-entropy; 1 - alpha goes to the per-code soft (KL) term
        temperature=1.0,
        sequence_samples=0,  # > 0: also a sequence-level KD student on this many teacher samples
    ))
    config.eval = sample_eval_config(judge=str(DIGITS32_JUDGE), num_samples=2000)
    return apply_arg(config, arg, VARIANTS, where="configs/vqvae_prior_kd.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: 8x8 images, a 4x4 grid of 8 codes; the tests give a judge
    (`--config.eval.judge=`, e.g. `kdjax.pretrained.tiny`'s)."""
    config.data.resolution = 8
    config.vqvae.checkpoint = config.teacher.checkpoint = ""  # both trained here
    config.vqvae.kwargs.update(dict(num_codes=8, code_dim=4, features=8, downsamples=1, res_blocks=1))
    config.levels = 8
    config.vqvae.train.num_steps = 20
    config.teacher.kwargs.update(dict(features=8, layers=2, kernel_size=3, embed=4))
    config.student.kwargs.update(dict(features=4, layers=2, kernel_size=3, embed=2))
    config.teacher.train.num_steps = config.student.train.num_steps = 20
    for block in (config.vqvae.train, config.teacher.train, config.student.train):
        block.batch_size = 32
    config.eval.judge = ""
    config.eval.num_samples = 16
    config.log_every = config.checkpoint_every = 10
    config.eval_batch_size = 64


VARIANTS = {"tiny": tiny}
