"""The validation inferer of the training configs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer

from ldct_clip.networks import pad_to_multiple

__all__ = ["PaddedInferer"]


class PaddedInferer(Inferer):
    """Reflect-pads (B, C, H, W) batches at the bottom/right to a multiple of ``multiple`` before the
    network and crops back, as the reference validation and evaluation do (``window_size: 32``).

    Args:
        multiple: the multiple (32 as in the reference).
    """

    def __init__(self, multiple: int = 32) -> None:
        super().__init__()
        self.multiple = int(multiple)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        return network(pad_to_multiple(inputs, self.multiple), *args, **kwargs)[..., :height, :width]
