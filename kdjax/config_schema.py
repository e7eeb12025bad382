"""Config blocks shared by every kdjax config, each with a default for every field.

Configs in `configs/` build their `ConfigDict` from these, so the schema is explicit: with
`lock_config=True` an unknown `--config.x.y` or a value of the wrong type fails at the command line, and
`kdjax.train.check_config` checks names, ranges and paths before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from kdjax.optim import optimizer_config

__all__ = ["data_config", "gan_config", "optimizer_config", "phase_train_config", "run_config"]


def data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data`: which images, at what size (see `kdjax.data`)."""
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
        task=task,  # which trainer runs (kdjax.train.TASKS)
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
    """`config.gan` for the `gan` task (`kdjax.gan`): StyleGAN2's recipe by default."""
    cfg = ml_collections.ConfigDict(dict(
        loss="logistic",  # "logistic" (non-saturating) or "hinge"
        r1_gamma=0.05,  # R1 weight gamma (0 = off); applied lazily as gamma/2 * r1_every every r1_every steps
        r1_every=16,
        ema_decay=0.999,  # generator EMA per step
        style_mixing_prob=0.0,  # StyleGAN2 generators only
        conditional=False,  # condition G and D on the dataset's labels
        train=phase_train_config(20000, 64, name="adam", learning_rate=2.5e-3, b1=0.0, b2=0.99),  # G's budget
        d_optimizer=optimizer_config("adam", 2.5e-3, b1=0.0, b2=0.99),
    ))
    cfg.update(overrides)
    return cfg
