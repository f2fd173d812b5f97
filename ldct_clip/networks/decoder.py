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

__all__ = ["ConvBlock", "DecoderStep", "conv3x3_by_taps", "make_up_path", "run_up_path"]


def conv3x3_by_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1) to few output channels, as a 1x1 convolution to its
    nine taps and a sum of the taps shifted into place.

    Same result up to float rounding (the sum over the nine kernel positions is done last). Why: oneDNN's
    direct kernels are slow for 1-3 output channels (the decoder's ``last`` conv, 64 -> 1), while a 1x1
    convolution to 9 channels runs near memory speed and the shifted sum is cheap (and one fused kernel
    under torch.compile).

    Args:
        x: ``(B, C, H, W)`` input.
        weight: ``(O, C, 3, 3)`` kernel.
        bias: ``(O,)`` or None.
    """
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    height, width = x.shape[-2], x.shape[-1]
    # tap k = 3 * dy + dx of output channel o is channel k * O + o of the 1x1 convolution
    taps = F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(9 * out_channels, in_channels, 1, 1))
    taps = F.pad(taps, (1, 1, 1, 1))
    y = taps[:, :out_channels, :height, :width]
    for k in range(1, 9):
        dy, dx = k // 3, k % 3
        y = y + taps[:, k * out_channels : (k + 1) * out_channels, dy : dy + height, dx : dx + width]
    return y if bias is None else y + bias.view(1, -1, 1, 1)


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

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward: the activations in place (no new tensor per activation)."""
        conv0, act0, conv1, act1 = self.block
        x = F.leaky_relu(conv0(x), act0.negative_slope, inplace=True)
        return F.leaky_relu(conv1(x), act1.negative_slope, inplace=True)


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
            # A float factor: TorchScript's interpolate takes no int one (same output: with
            # align_corners=True the sampling grid depends on the sizes only).
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
        return self.conv_block(x)

    def infer(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Inference forward (:meth:`ConvBlock.infer`); same result as :meth:`forward`."""
        if skip is not None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
        return self.conv_block.infer(x)


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
    """Decoder forward: step 0 on the deepest tap, then each step with the next shallower tap as skip.

    :meth:`CLIPDenoiser.decode` runs the same loop inside the module, where TorchScript can compile it
    (a scripted function cannot take a ``ModuleList``).
    """
    x = taps[-1]
    for i, step in enumerate(up_path):
        x = step(x) if i == 0 else step(x, taps[-1 - i])
    return x
