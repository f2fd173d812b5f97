"""Batch-level mixup, as a ``prepare_batch`` of MONAI's ``SupervisedTrainer`` (MONAI has no mixup that mixes
the input and the target of a pair alike)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.engines.utils import default_prepare_batch

from ldct_clip.errors import InputError

__all__ = ["Mixup"]


class Mixup:
    """Batch-level mixup of the reference (``Mixing_Augment`` with ``use_identity: true``), as a
    ``prepare_batch`` for MONAI's ``SupervisedTrainer``.

    With probability ``prob`` the batch is mixed with a random permutation of itself,
    ``x <- lam * x + (1 - lam) * x[perm]``, with the same ``lam ~ Beta(beta, beta)`` and the same
    permutation for the noisy input and the clean target; otherwise it passes unchanged. Draws come from
    torch's global generator (its state is part of ``ldct_clip.training.TrainingState``).

    Args:
        prob: probability that a batch is mixed (the reference: 0.5, a coin between mixup and identity).
        beta: parameter of the symmetric Beta distribution of ``lam`` (1.2).
        prepare_batch: how the batch becomes (input, target) on the device first.
    """

    def __init__(
        self, prob: float = 0.5, beta: float = 1.2, prepare_batch: Callable = default_prepare_batch
    ) -> None:
        if not 0 <= prob <= 1:
            raise InputError(f"mixup probability {prob} must be in [0, 1]")
        self.prob = float(prob)
        self.beta = float(beta)
        self.prepare_batch = prepare_batch

    def mix(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob == 0 or torch.rand(()).item() >= self.prob:
            return image, label
        lam = torch.distributions.Beta(torch.tensor(self.beta), torch.tensor(self.beta)).sample().item()
        perm = torch.randperm(image.shape[0]).to(image.device)
        return lam * image + (1 - lam) * image[perm], lam * label + (1 - lam) * label[perm]

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        return self.mix(image, label)
