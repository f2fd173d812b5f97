"""The learnable U-Net-style decoder over the CLIP taps.

Own modules rather than MONAI's ``UnetUpBlock``/``Convolution``: the module names here
(``up_path.{i}.conv_block.block.{0,2}``) are the reference implementation's, so checkpoints of the
published code load key for key, and MONAI's blocks add normalisation/activation wrappers the method
does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBlock", "DecoderStep", "make_up_path", "run_up_path"]


class ConvBlock(nn.Module):
    """conv3x3 -> LeakyReLU -> conv3x3 -> LeakyReLU, held as ``self.block`` (indices 0 and 2 are the convs).

    Args:
        in_channels: input channels.
        out_channels: output channels of both convolutions.
        slope: negative slope of the LeakyReLU.
        bias: whether the convolutions have a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.2, bias: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            nn.LeakyReLU(slope),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            nn.LeakyReLU(slope),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderStep(nn.Module):
    """One decoder step: optionally x2 bilinear upsampling (align_corners=True) and ``cat([up, skip])``,
    then a :class:`ConvBlock`.

    Args:
        in_channels: channels entering the conv block (after the concatenation).
        out_channels: channels leaving it.
        slope: LeakyReLU negative slope.
        bias: conv bias.
    """

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.2, bias: bool = False) -> None:
        super().__init__()
        self.conv_block = ConvBlock(in_channels, out_channels, slope, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            # The network pads its input to a multiple of 16, so the upsampled map and the skip always
            # have the same size (the reference's centre crop is then the identity).
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
        return self.conv_block(x)


def make_up_path(
    tap_channels: Sequence[int], slope: float = 0.2, bias: bool = False
) -> tuple[nn.ModuleList, int]:
    """The decoder steps over the five encoder taps, deepest first, and the channels they end with.

    Step 0 is a conv block on the deepest tap (layer3, 16w -> 8w channels for stem width w); each later
    step upsamples, concatenates the next shallower tap and applies a conv block: 16w -> 4w, 8w -> 2w,
    3w -> w, (w + 3) -> w; for RN50 (w = 64) that is 1024->512, 1024->256, 512->128, 192->64, 67->64.
    The caller holds the list as ``up_path`` (the reference's name, so state-dict keys match).

    Args:
        tap_channels: channels of the taps, shallowest first: (3, w, 4w, 8w, 16w).
        slope: LeakyReLU negative slope.
        bias: conv bias.
    """
    deepest_first = list(tap_channels)[::-1]
    channels = deepest_first[0] // 2
    up_path = nn.ModuleList([DecoderStep(deepest_first[0], channels, slope, bias)])
    for i, skip_channels in enumerate(deepest_first[1:], start=1):
        # Halve the channels at every step but the last (the image tap), as the reference does.
        out = channels if i == len(deepest_first) - 1 else channels // 2
        up_path.append(DecoderStep(channels + skip_channels, out, slope, bias))
        channels = out
    return up_path, channels


def run_up_path(up_path: nn.ModuleList, taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Decoder forward: step 0 on the deepest tap, then each step with the next shallower tap as skip."""
    x = up_path[0](taps[-1])
    for i, step in enumerate(up_path[1:], start=1):
        x = step(x, taps[-1 - i])
    return x
