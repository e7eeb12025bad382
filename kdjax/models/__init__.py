"""The model zoo, picked by name from a config.

Every model is a Flax Linen module (a description; `apply` is pure). A config names a model by one of
the keys below and gives its fields in a `ConfigDict`; `build_model` checks the fields against the
module's dataclass fields before anything is compiled, so a typo fails with the list of valid fields.

Conventions shared by all models (see each module's docstring for the details):
- images are NHWC, float, scaled to [-1, 1];
- `dtype` is the compute dtype (float32 on CPU, bfloat16 on GPU/TPU); parameters stay float32;
- generators: `__call__(z, labels=None, *, train=False, return_features=False)` returns images, or
  `(images, features)` with `features` a dict of named intermediate maps (e.g. `"res8"`, `"res16"`);
- classifiers: `__call__(x, *, train=False, return_features=False)` returns logits, or
  `(logits, features)`;
- discriminators: `__call__(x, labels=None, *, train=False)` returns one logit per image, shape (B,);
- randomness only through rng streams (`noise`, `dropout`); non-trainable state in collections
  (`batch_stats`, `w_avg`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import flax.linen as nn

# name -> "module:attribute". Imported on demand so that one family's import cost is paid only when used.
REGISTRY: dict[str, str] = {
    # Classifiers (classic-KD teacher/student, and the judge of generated images).
    "resnet": "kdjax.models.classifier:ResNet",
    "cnn": "kdjax.models.classifier:SmallCNN",
    # StyleGAN2 (Karras et al. 2020, config F).
    "stylegan2_generator": "kdjax.models.stylegan2:Generator",
    "stylegan2_discriminator": "kdjax.models.stylegan2:Discriminator",
    # DCGAN (Radford et al. 2016).
    "dcgan_generator": "kdjax.models.dcgan:Generator",
    "dcgan_discriminator": "kdjax.models.dcgan:Discriminator",
}


def model_class(name: str) -> type[nn.Module]:
    """Returns the module class registered under `name`.

    Raises:
      ValueError: `name` is not registered; the message lists the valid names.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; valid names: {sorted(REGISTRY)}.")
    module_name, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def model_fields(name: str) -> list[str]:
    """The constructor fields of model `name` (excluding Flax's own `parent` and `name`)."""
    cls = model_class(name)
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name") and f.init]


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], where: str = "config.model") -> None:
    """Raises ValueError naming any field in `kwargs` that model `name` does not have."""
    valid = model_fields(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{where}: model {name!r} has no field(s) {unknown}; valid fields: {sorted(valid)}.")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiates model `name` with `kwargs`, after checking every field name."""
    check_model_kwargs(name, kwargs)
    return model_class(name)(**kwargs)
