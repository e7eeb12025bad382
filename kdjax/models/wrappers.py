"""Generators made of other generators, for distillation: each declares the generator interface (`spec`).

- `DistillationTargets`: the frozen teacher as the student is taught to copy it (StyleGAN2: constant noise
  inputs, truncation psi; any other family: eval mode). The report evaluates exactly these images as "the
  teacher" and as the students' fidelity reference.
- `MappedStudent`: a student that consumes the teacher's w (`reuse_mapping`), wrapped to take z like any
  generator: w = teacher.mapping(z), images = student(w).
- `AtStage`: a progressively grown student at one stage of its growth, at full size.
Their variables hold the inner modules' one level down (`targets_variables`, `mapped_variables`; `AtStage`'s
are its generator's under "generator").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import stylegan2
from kdjax.models.interface import GeneratorSpec


class DistillationTargets(nn.Module):
    """The teacher's distillation targets: a StyleGAN2 teacher with its constant noise inputs and truncation
    `truncation_psi`; any other generator family in eval mode, where truncation must be 1."""

    teacher: nn.Module
    truncation_psi: float = 1.0

    @property
    def spec(self) -> GeneratorSpec:
        return self.teacher.spec

    def __call__(self, z, labels=None, *, train: bool = False, return_features: bool = False):
        del train  # the teacher is frozen: always eval mode
        if isinstance(self.teacher, stylegan2.Generator):
            return self.teacher(z, labels, noise_mode="const", truncation_psi=self.truncation_psi,
                                return_features=return_features)
        return self.teacher(z, labels, train=False, return_features=return_features)


def targets_variables(teacher_vars: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of `DistillationTargets` from the teacher's."""
    return {collection: {"teacher": v} for collection, v in teacher_vars.items()}


class MappedStudent(nn.Module):
    """w = teacher.mapping(z) (frozen, truncated with `truncation_psi`), images = student(w)."""

    teacher: nn.Module
    student: nn.Module
    truncation_psi: float = 1.0

    @property
    def spec(self) -> GeneratorSpec:
        return dataclasses.replace(self.student.spec, z_dim=self.teacher.spec.z_dim)

    def __call__(self, z, labels=None, *, train: bool = False, return_features: bool = False):
        w = self.teacher.mapping(z, labels, truncation_psi=self.truncation_psi)[:, 0]
        return self.student(w, labels, train=train, return_features=return_features)


def mapped_variables(teacher_vars: Mapping[str, Any], student_vars: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of a `MappedStudent`: each collection split into its "teacher" and "student" parts."""
    return {c: {**({"teacher": teacher_vars[c]} if c in teacher_vars else {}),
                **({"student": student_vars[c]} if c in student_vars else {})}
            for c in {*teacher_vars, *student_vars}}


class AtStage(nn.Module):
    """A growing generator as it is at one stage of its growth: its `stage` x `stage` images (with fade-in
    `alpha`) pixel-repeated to the full resolution, so that it is evaluated like any generator."""

    generator: nn.Module
    stage: int
    alpha: float = 1.0

    @property
    def spec(self) -> GeneratorSpec:
        return self.generator.spec

    def __call__(self, z, labels=None, *, train: bool = False, return_features: bool = False):
        out = self.generator(z, labels, train=train, return_features=return_features, stage=self.stage,
                             alpha=self.alpha)
        images = out[0] if return_features else out
        up = self.generator.spec.resolution // self.stage
        images = jnp.repeat(jnp.repeat(images, up, axis=1), up, axis=2)
        return (images, out[1]) if return_features else images
