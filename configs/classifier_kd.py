"""Classic knowledge distillation (Hinton et al. 2015) on the embedded digits: ResNet teacher -> small CNN.

    python launch.py --config=configs/classifier_kd.py
    python launch.py --config=configs/classifier_kd.py:tiny          # seconds; what the tests run
    python launch.py --config=configs/classifier_kd.py:tiny,seed=1   # any field as FIELD=VALUE (kdjax.config.args)
    python launch.py --config=configs/classifier_kd.py --config.kd.temperature=2 --config.kd.alpha=0.5

On CIFAR-10 with a GPU (downloads the dataset where a network exists):

    python launch.py --config=configs/classifier_kd.py:cifar10

Time on the 2-core CPU of the project machine: see the README's Results section.
"""

import ml_collections

from kdjax.config import apply_arg, data_config, phase_train_config, run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = run_config("classifier_kd", log_every=100, checkpoint_every=500)
    config.data = data_config(source="digits", resolution=16, channels=1)
    config.teacher = ml_collections.ConfigDict(dict(
        model="resnet",
        kwargs=ml_collections.ConfigDict(dict(widths=(32, 64, 128), blocks_per_stage=(1, 1, 1))),
        checkpoint="",  # a model bundle to use as the (frozen) teacher instead of training one
        train=phase_train_config(1500, 128, name="adam", learning_rate=2e-3, schedule="cosine"),
    ))
    config.student = ml_collections.ConfigDict(dict(
        model="cnn",
        kwargs=ml_collections.ConfigDict(dict(widths=(4, 8), use_batch_norm=False)),
        train=phase_train_config(1500, 128, name="adam", learning_rate=5e-3, schedule="cosine"),
    ))
    config.kd = ml_collections.ConfigDict(dict(
        alpha=0.1,  # weight of the hard-label cross-entropy; 1 - alpha goes to the soft (KL) term
        temperature=4.0,  # softmax temperature T of the soft term (which is scaled by T^2)
        embedding=0.0,  # weight of relational embedding distillation (RKD-D on the pooled features; retrieval)
    ))
    return apply_arg(config, arg, VARIANTS, where="configs/classifier_kd.py")


def tiny(config: ml_collections.ConfigDict) -> None:
    """The test-suite size: a few seconds end to end."""
    config.data.resolution = 8
    config.teacher.kwargs.widths = (8, 16)
    config.teacher.kwargs.blocks_per_stage = (1, 1)
    config.teacher.train.num_steps = config.student.train.num_steps = 20
    config.teacher.train.batch_size = config.student.train.batch_size = 32
    config.log_every = config.checkpoint_every = 10
    config.eval_batch_size = 64


def cifar10(config: ml_collections.ConfigDict) -> None:
    """CIFAR-10 on a GPU/TPU (TFDS; downloads where a network exists): a ResNet-20 teacher."""
    config.data = data_config(source="tfds", name="cifar10", resolution=32, channels=3)
    config.teacher.kwargs.blocks_per_stage = (3, 3, 3)  # ResNet-20
    config.student.kwargs.widths = (32, 64)
    config.teacher.train.num_steps = config.student.train.num_steps = 30_000
    config.compute_dtype = "bfloat16"


VARIANTS = {"tiny": tiny, "cifar10": cifar10}
