"""Config blocks shared by kdjax's configs, each with a default for every field.

Configs in `configs/` build their `ConfigDict` from these, so the schema is explicit: with
`lock_config=True` an unknown `--config.x.y` or a value of the wrong type fails at the command line, and
each task's `check_config` checks names, ranges and paths before anything is compiled. This module imports
ml_collections only, so reading a config costs no JAX import.
"""

from __future__ import annotations

import ml_collections

# The terms of the generator-distillation objective (`kdjax.steps.distill`), each weighted in
# `config.distill.weights.TERM`.
DISTILL_TERMS = ("kl", "recon_l1", "recon_l2", "perceptual", "feature", "adv")


def optimizer_config(name: str = "adam", learning_rate: float = 1e-3, **overrides) -> ml_collections.ConfigDict:
    """An optimizer block (`kdjax.core.optim`) with a default for every field."""
    cfg = ml_collections.ConfigDict(dict(name=name, learning_rate=learning_rate, schedule="constant",
                                         warmup_steps=0, momentum=0.9, b1=0.9, b2=0.999, weight_decay=1e-4,
                                         grad_clip=0.0))
    cfg.update(overrides)
    return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data`: which images, at what size (see `kdjax.core.data`)."""
    cfg = ml_collections.ConfigDict(dict(
        source="digits",  # "digits" | "tfds" | "folder"
        name="",  # TFDS dataset name, for source="tfds"
        data_dir="",  # TFDS data_dir ("" = TFDS default)
        download=True,  # TFDS: download and prepare when missing (needs a network)
        train_split="train",  # TFDS split names (slicing allowed: "train[:90%]")
        test_split="test",
        image_key="image",  # TFDS feature holding the image
        label_key="label",  # TFDS feature holding the class ("" = unlabelled)
        folder="",  # a folder of images, for source="folder"
        resolution=16,  # images are resized to resolution x resolution
        channels=1,  # 1 (grey) or 3 (RGB)
        test_fraction=0.2,  # held-out fraction for digits and folders (a fixed split)
        validation_fraction=0.0,  # part of the training images held out to choose settings on (0 = none)
        num_threads=2,  # background threads reading and decoding batches
    ))
    cfg.update(overrides)
    return cfg


def phase_train_config(num_steps: int, batch_size: int, **optimizer) -> ml_collections.ConfigDict:
    """A training phase's budget: steps, global batch size, optimizer block."""
    return ml_collections.ConfigDict(dict(num_steps=num_steps, batch_size=batch_size,
                                          optimizer=optimizer_config(**optimizer)))


def run_config(task: str, **overrides) -> ml_collections.ConfigDict:
    """Top-level fields every task has."""
    cfg = ml_collections.ConfigDict(dict(
        task=task,  # which trainer runs (kdjax.tasks.TASKS)
        seed=0,  # every random draw is a function of (seed, step)
        compute_dtype="float32",  # "float32" (CPU) or "bfloat16" (GPU/TPU); parameters stay float32
        log_every=50,  # steps between metric lines / TensorBoard points
        checkpoint_every=500,  # steps between checkpoints (also saved at the end of each phase)
        max_to_keep=2,  # checkpoints kept per phase
        async_checkpoints=True,  # write checkpoints in the background
        stop_after_steps=-1,  # stop this launch (after a checkpoint) after N steps; relaunch to resume
        eval_batch_size=256,  # global batch for evaluation passes
    ))
    cfg.update(overrides)
    return cfg


def gan_config(**overrides) -> ml_collections.ConfigDict:
    """`config.gan` for the `gan` task (`kdjax.tasks.gan`): StyleGAN2's recipe by default."""
    cfg = ml_collections.ConfigDict(dict(
        loss="logistic",  # "logistic" (non-saturating) or "hinge"
        r1_gamma=0.05,  # R1 weight gamma (0 = off); applied lazily as gamma/2 * r1_every every r1_every steps
        r1_every=16,
        ema_decay=0.999,  # generator EMA per step
        style_mixing_prob=0.0,  # StyleGAN2 generators only
        conditional=False,  # condition G and D on the dataset's labels
        init_generator="",  # a generator bundle to start G (and its EMA) from instead of a random init
        g_warmup_steps=0,  # G's updates are scaled by 0 for this many first steps (D catches up with a given G)
        train=phase_train_config(20000, 64, name="adam", learning_rate=2.5e-3, b1=0.0, b2=0.99),  # G's budget
        d_optimizer=optimizer_config("adam", 2.5e-3, b1=0.0, b2=0.99),
    ))
    cfg.update(overrides)
    return cfg


def distill_config(**overrides) -> ml_collections.ConfigDict:
    """`config.distill`: the weights of the generator-distillation terms (each with an optional linear
    schedule from `value` to `end_value` over [start_step, end_step]; weight 0 = off) and the objective's
    options (`kdjax.steps.distill`)."""
    term = lambda value: ml_collections.ConfigDict(dict(value=value, end_value=value, start_step=0, end_step=0))
    cfg = ml_collections.ConfigDict(dict(
        weights=ml_collections.ConfigDict({t: term(0.0) for t in DISTILL_TERMS}),
        temperature=4.0, alpha=0.1, reuse_mapping=False, truncation_psi=1.0, adv_loss="logistic",
        d_real_data=False, r1_gamma=0.05, r1_every=16, ema_decay=0.999,
        # Grow the (DCGAN) student from start_resolution to the full resolution, the steps split evenly over
        # the stages, each new stage faded in over fade_fraction of its steps.
        progressive=ml_collections.ConfigDict(dict(enabled=False, start_resolution=8, fade_fraction=0.5))))
    cfg.update(overrides)
    return cfg


def vqvae_config(model: str = "", checkpoint: str = "", train: ml_collections.ConfigDict | None = None,
                 **kwargs) -> ml_collections.ConfigDict:
    """`config.vqvae` of `pixelcnn_kd`: a VQ-VAE whose codes the PixelCNNs model (model "" = none: they model
    the images). Trained first (phase `vqvae`, `train`) or loaded from the bundle `checkpoint`."""
    return ml_collections.ConfigDict(dict(
        model=model,  # "vqvae" or "" (no autoencoder)
        kwargs=ml_collections.ConfigDict(kwargs),  # the model's fields (resolution, channels: from the data)
        checkpoint=checkpoint,  # an autoencoder bundle; "" trains one with `train`
        train=train if train is not None else phase_train_config(2000, 64, name="adam", learning_rate=1e-3),
        beta=0.25,  # weight of the commitment term (z_e - sg(z_q))^2
        ema_decay=0.99,  # decay of the codebook's moving averages
    ))


def sample_eval_config(judge: str = "", num_samples: int = 2000) -> ml_collections.ConfigDict:
    """`config.eval` of `pixelcnn_kd`: how samples are scored. With a judge classifier bundle, every model's
    samples get FID, KID and precision/recall/density/coverage against the real images in its features."""
    return ml_collections.ConfigDict(dict(
        judge=judge,  # a classifier bundle recording its input_shape; "" = bits/dim and samples.png only
        num_samples=num_samples,  # samples per model (samples.png shows the first 16)
        real_split="all",  # the real set: "all" (train and test, the GAN protocol), "train" or "test"
    ))


def degradation_config(name: str = "downsample", **params) -> ml_collections.ConfigDict:
    """`config.degradation` of an image-to-image task: a name of `kdjax.core.degradations.DEGRADATIONS` and the
    parameters given for it (the others keep the degradation's defaults), e.g.
    `degradation_config("downsample", scale=2)`, `degradation_config("noise", sigma=25.0)`."""
    return ml_collections.ConfigDict(dict(name=name, **params))


def photos_data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data` of an image-to-image task: photographs, cropped for training (`kdjax.core.photos`)."""
    cfg = ml_collections.ConfigDict(dict(
        source="skimage",  # "skimage" (its photographs) | "lfw" (its 100 25x25 LFW faces) | "sklearn" | "folder"
        folder="",  # a folder of photographs, for source="folder"
        channels=3,  # 1 (grey) or 3 (RGB)
        crop=48,  # training crops are crop x crop pixels of the clean photograph (the target)
        test_fraction=0.2,  # held-out fraction of the photographs (a fixed split by whole image)
        validation_fraction=0.0,  # fraction of the rest set aside (whole images) to choose settings on
        extra_validation="",  # "" or another packaged source ("skimage" | "lfw" | "sklearn"), all in validation
        eval_max_side=0,  # > 0: evaluate on centre crops of at most this many pixels a side (0: whole photos)
        num_threads=2,  # background threads cropping and degrading training pairs
    ))
    cfg.update(overrides)
    return cfg
