"""Time kdjax's GAN step (`kdjax.steps.gan.make_gan_step`) for each DCGAN up-sampling mode, in one run.

    python benchmarks/dcgan_upsample.py [--batch=64] [--iters=10]

Prints the median step time per mode on the default device (compare modes as ratios within one run).
"""

import argparse
import time

import jax
import numpy as np
import optax

from kdjax import models
from kdjax.config import gan_config
from kdjax.core import parallel
from kdjax.evaluation import cost
from kdjax.steps import gan
from kdjax.models.dcgan import UPSAMPLE_MODES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    mesh = parallel.make_mesh(jax.devices()[:1])
    cfg = gan_config(r1_gamma=0.0)
    shape = (32, 3, 0)
    batch = parallel.global_batch({"image": np.random.default_rng(0).uniform(-1, 1, (args.batch, 32, 32, 3))
                                   .astype(np.float32), "label": np.zeros(args.batch, np.int32)}, mesh)
    print(f"device: {cost.device_name()}; DCGAN G (width 24) + D (width 64) step at 32x32, batch {args.batch}")
    for mode in UPSAMPLE_MODES:
        g = models.build_model("dcgan_generator", resolution=32, img_channels=3, upsample=mode, bn_axis_name="data")
        d = models.build_model("dcgan_discriminator", resolution=32, img_channels=3)
        tx = optax.adam(2e-4, b1=0.0, b2=0.99)
        key = jax.random.key(0)
        state = parallel.replicate(gan.init_state(g, d, tx, tx, shape, g.z_dim, 0, key), mesh)
        step = gan.make_gan_step(g, d, tx, tx, mesh, cfg, g.z_dim, 0, key)
        for _ in range(2):  # compile and warm up
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            state, _ = step(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        print(f"{mode:10s} {1e3 * float(np.median(times)):8.1f} ms/step")


if __name__ == "__main__":
    main()
