"""The time structure of a training run: rounds between checkpoints, and the learning-rate schedule.

One schedule for every task, built from torch's schedulers and stepped every iteration: the optimizer's
rate held for ``constant_iterations``, then cosine-annealed to ``eta_min``.

- CT: ``constant_iterations = 0``, a cosine from the start.
- sRGB and synthetic noise: the reference's ``CosineAnnealingRestartCyclicLR`` with periods
  (92000, 208000) and ``eta_mins`` (3e-4, 1e-6): a first period whose cosine runs from 3e-4 to 3e-4 (so a
  constant rate), then one cosine from 3e-4 down to 1e-6 over the remaining 208k of 300k iterations.

:func:`constant_then_cosine` is torch's ``SequentialLR`` of ``ConstantLR(factor=1)`` and
``CosineAnnealingLR`` (plain ``CosineAnnealingLR`` when nothing is constant): no own arithmetic, and its
``state_dict`` resumes with the rest of a run.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, SequentialLR

from ldct_clip.errors import InputError

__all__ = ["PAPER_CONSTANT_FRACTION", "constant_then_cosine", "constant_then_cosine_lr", "round_length"]

#: The reference's constant part of its 300k-iteration RGB schedules (92k / 300k).
PAPER_CONSTANT_FRACTION = 92000 / 300000


def round_length(iterations: int, preferred: int = 1000) -> int:
    """The largest divisor of ``iterations`` not above ``preferred``: iterations per round (ignite epoch).

    Raises:
        InputError: ``iterations`` or ``preferred`` not positive.
    """
    iterations, preferred = int(iterations), int(preferred)
    if iterations < 1 or preferred < 1:
        raise InputError(f"iterations ({iterations}) and the round length ({preferred}) must be positive")
    return max(d for d in range(1, min(iterations, preferred) + 1) if iterations % d == 0)


class _QuietSequentialLR(SequentialLR):
    """``SequentialLR`` without the deprecation warning it triggers itself at each milestone (it calls
    the next scheduler's ``step(0)``, which torch warns about)."""

    def step(self) -> None:  # type: ignore[override]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The epoch parameter", category=UserWarning)
            super().step()


def constant_then_cosine(
    optimizer: torch.optim.Optimizer, iterations: int, constant_iterations: int = 0, eta_min: float = 1e-6
) -> LRScheduler:
    """The optimizer's learning rate held for ``constant_iterations`` steps, then cosine-annealed to
    ``eta_min`` at step ``iterations``; step it every iteration
    (``monai.handlers.LrScheduleHandler(epoch_level=False)``).

    Args:
        optimizer: the optimizer; its ``lr`` is the constant rate (3e-4 in the paper).
        iterations: total training iterations (the paper: 40000 for CT, 300000 for the RGB tasks).
        constant_iterations: iterations at the constant rate (the paper: 0 for CT, 92000 for the RGB
            tasks); 0 gives a plain cosine.
        eta_min: final learning rate (1e-6).

    Raises:
        InputError: ``constant_iterations`` not in [0, ``iterations``).
    """
    iterations, constant_iterations = int(iterations), int(constant_iterations)
    if not 0 <= constant_iterations < iterations:
        raise InputError(
            f"the constant part of the LR schedule ({constant_iterations} iterations) must be shorter than "
            f"the whole run ({iterations} iterations) and not negative"
        )
    if constant_iterations == 0:
        return CosineAnnealingLR(optimizer, T_max=iterations, eta_min=float(eta_min))
    constant = ConstantLR(optimizer, factor=1.0, total_iters=constant_iterations)
    cosine = CosineAnnealingLR(optimizer, T_max=iterations - constant_iterations, eta_min=float(eta_min))
    return _QuietSequentialLR(optimizer, [constant, cosine], milestones=[constant_iterations])


def constant_then_cosine_lr(
    step: int, base_lr: float, iterations: int, constant_iterations: int = 0, eta_min: float = 1e-6
) -> float:
    """The closed form of :func:`constant_then_cosine`: the learning rate used at (0-based) step ``step``."""
    if step < constant_iterations:
        return float(base_lr)
    progress = min(step - constant_iterations, iterations - constant_iterations) / (
        iterations - constant_iterations
    )
    return float(eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2)
