"""Time `kdjax.evaluate.evaluate_generators` on the default digits architectures (random weights).

    python benchmarks/evaluate_time.py [--num_samples=1000]

Builds the default 32x32 StyleGAN2 teacher and DCGAN student (1 channel) and a ResNet judge with random
weights, then evaluates both against the held-out digits at 32x32, as the generator report will. The
figure is the evaluation's own `eval_seconds` (sampling, features, every metric, cost timing).
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp

from kdjax import models
from kdjax.config import data_config
from kdjax.core.data import all_images, load_dataset
from kdjax.evaluation import generators as evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_samples", type=int, default=1000)
    args = p.parse_args()
    key = jax.random.key(0)
    teacher = models.build_model("stylegan2_generator", img_resolution=32, img_channels=1)
    student = models.build_model("dcgan_generator", resolution=32, img_channels=1, z_dim=teacher.z_dim)
    judge = models.build_model("resnet", num_classes=10, widths=(32, 64, 128), blocks_per_stage=(1, 1, 1))
    gens = {"teacher": (teacher, teacher.init({"params": key, "noise": key}, jnp.zeros((2, teacher.z_dim)))),
            "student": (student, student.init(key, jnp.zeros((2, student.z_dim))))}
    judge_vars = judge.init(key, jnp.zeros((2, 32, 32, 1)))
    split = load_dataset(data_config(resolution=32, channels=1)).test
    real = all_images(split)
    report = evaluate.evaluate_generators(gens, (judge, judge_vars), real, reference="teacher",
                                          num_samples=args.num_samples, batch_size=256, seed=0,
                                          workdir=tempfile.mkdtemp())
    print(f"{args.num_samples} samples per model, {report['num_real']} real images, {report['device']}: "
          f"eval_seconds = {report['eval_seconds']:.1f}")


if __name__ == "__main__":
    main()
