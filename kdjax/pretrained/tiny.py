"""Random-initialised tiny teacher and judge bundles for smoke runs of the `:tiny` configs.

`configs/stylegan_to_dcgan.py:tiny` runs at 16x16x1 and needs a teacher and a judge of that shape; these
are the smallest that fit (a 2-layer-mapping StyleGAN2 of 16 channels, a 2-stage CNN). The tests and the
notebooks' CI mode use them. **They have learned nothing**: a run on them checks the plumbing, never the
quality of distillation. Real runs use `kdjax/pretrained/digits32` or a bundle of your own.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from kdjax.models import build_model
from kdjax.models.bundles import save_model_bundle

TEACHER_KWARGS = dict(z_dim=16, w_dim=16, img_resolution=16, img_channels=1, channel_base=256, channel_max=16,
                      mapping_layers=2)
JUDGE_KWARGS = dict(num_classes=10, widths=(4, 8))
NOISE_STRENGTH = 0.2  # the tiny teacher's per-layer noise strengths (random init has 0)


def write_tiny_bundles(root: str | pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `root/teacher` (stylegan2_generator) and `root/judge` (cnn) model bundles, random-initialised
    from `seed`, and returns their paths (teacher, judge)."""
    root = pathlib.Path(root)
    key = jax.random.key(seed)
    res, ch = TEACHER_KWARGS["img_resolution"], TEACHER_KWARGS["img_channels"]
    teacher = build_model("stylegan2_generator", **TEACHER_KWARGS)
    t_vars = teacher.init({"params": key, "noise": key}, jnp.zeros((2, TEACHER_KWARGS["z_dim"])))
    # StyleGAN2 initialises every noise strength at 0; a trained teacher's are not, and noise must matter here.
    t_vars = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, NOISE_STRENGTH) if path[-1].key == "noise_strength" else v, t_vars)
    save_model_bundle(root / "teacher", "stylegan2_generator", TEACHER_KWARGS, t_vars)
    judge = build_model("cnn", **JUDGE_KWARGS)
    j_vars = judge.init(jax.random.fold_in(key, 1), jnp.zeros((2, res, res, ch)))
    save_model_bundle(root / "judge", "cnn", JUDGE_KWARGS, j_vars, extra={"input_shape": [res, res, ch]})
    return root / "teacher", root / "judge"
