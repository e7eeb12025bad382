"""Sizing a student for a teacher under a FLOPs budget (XLA's count, `kdjax.evaluation.cost`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from kdjax.evaluation.cost import summary


def widest_under_budget(teacher: str, teacher_kwargs: Mapping[str, Any], student: str = "dcgan_generator",
                        budget: float = 1 / 8, widths: Sequence[int] = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128),
                        **student_kwargs: Any) -> tuple[dict[str, Any], float]:
    """Sizes a student for a teacher: the widest `student` (its `width` field, from `widths`, ascending) whose
    FLOPs per image are at most `budget` times the teacher's (both counted by `summary`, untimed).

    Returns:
      (the student's kwargs with `width` set, its FLOPs as a fraction of the teacher's).
    Raises:
      ValueError: not even the narrowest width fits the budget (the message gives both counts).
    """
    teacher_flops = summary(teacher, timed=False, **teacher_kwargs).flops_per_image
    best: tuple[int, float] | None = None
    for width in sorted(widths):
        flops = summary(student, timed=False, width=width, **student_kwargs).flops_per_image
        if flops > budget * teacher_flops:  # FLOPs grow with the width: no wider one fits either
            if best is None:
                raise ValueError(f"no {student} width in {sorted(widths)} fits {budget:.3g} x the teacher's "
                                 f"{teacher_flops / 1e6:.1f} MFLOPs/image (the narrowest needs {flops / 1e6:.1f}).")
            break
        best = (width, flops)
    return {**student_kwargs, "width": best[0]}, best[1] / teacher_flops
