"""What the inferers call on a batch of 2-D slices: pad, run the network (maybe mixed precision), crop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldct_clip.networks import pad_to_multiple

__all__ = ["PAD_MULTIPLE", "SlicePredictor"]

#: The reference evaluation reflect-pads every test image to a multiple of 32 before the network.
PAD_MULTIPLE = 32


class SlicePredictor(nn.Module):
    """A 2-D network applied to a batch of slices ``(B, C, H, W)`` as the reference evaluation applies it.

    Reflect-pads the bottom/right edges to a multiple of ``multiple`` (the reference's ``pad_test``), runs
    the network under autocast when ``amp_dtype`` is set, crops back and returns float32.

    Args:
        network: the 2-D network, ``(B, C, H, W) -> (B, C_out, H, W)``, or any callable such as a compiled
            or exported backend of it.
        multiple: pad height and width up to a multiple of this (1: no padding).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for float32.
        channels_last: run the network in NHWC memory format (converts ``network`` in place when it is a
            module, and feeds it NHWC batches): much faster oneDNN convolutions on CPUs
            (benchmarks/README.md). Results differ from NCHW by float rounding only.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        multiple: int = PAD_MULTIPLE,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if channels_last and isinstance(network, nn.Module):
            network.to(memory_format=torch.channels_last)
        self.network = network
        self.multiple = int(multiple)
        self.amp_dtype = amp_dtype

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        height, width = x.shape[-2:]
        if self.multiple > 1:
            x = pad_to_multiple(x, self.multiple)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                y = self.network(x)
        else:
            y = self.network(x)
        return y[..., :height, :width].float().contiguous()
