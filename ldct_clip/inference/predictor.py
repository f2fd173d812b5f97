"""What the inferers call on a batch of 2-D slices: pad, run the network (maybe mixed precision, maybe over
the slice's rotated and mirrored views), crop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldct_clip.networks import pad_to_multiple

__all__ = ["DIHEDRAL_VIEWS", "PAD_MULTIPLE", "SlicePredictor"]

#: The reference evaluation reflect-pads every test image to a multiple of 32 before the network.
PAD_MULTIPLE = 32

#: ``(quarter turns, mirrored)`` of the eight symmetries of a square; the first four keep any slice's shape,
#: the last four swap its height and width.
DIHEDRAL_VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))


def _view(x: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    x = x.flip(-1) if mirrored else x
    return torch.rot90(x, turns, (-2, -1)).contiguous() if turns else x


def _unview(y: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    y = torch.rot90(y, -turns, (-2, -1)) if turns else y
    return y.flip(-1) if mirrored else y


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
        self_ensemble: average the network's outputs over the slice's rotations by 90 degrees and their
            mirror images, each mapped back (the "x8" self-ensemble of image restoration): the network is
            not exactly equivariant to them, and its errors partly cancel in the mean. Eight views for a
            square (padded) slice, the four that keep the shape otherwise, so a backend built for one batch
            shape keeps it; as many times the network's time. Gains and costs: benchmarks/README.md.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        multiple: int = PAD_MULTIPLE,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        self_ensemble: bool = False,
    ) -> None:
        super().__init__()
        self.self_ensemble = bool(self_ensemble)
        self.channels_last = channels_last
        if channels_last and isinstance(network, nn.Module):
            network.to(memory_format=torch.channels_last)
        self.network = network
        self.multiple = int(multiple)
        self.amp_dtype = amp_dtype

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                return self.network(x).float()
        return self.network(x).float()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        height, width = x.shape[-2:]
        if self.multiple > 1:
            x = pad_to_multiple(x, self.multiple)
        if not self.self_ensemble:
            y = self._run(x)
        else:
            views = DIHEDRAL_VIEWS if x.shape[-2] == x.shape[-1] else DIHEDRAL_VIEWS[:4]
            y = None
            for turns, mirrored in views:
                out = _unview(self._run(_view(x, turns, mirrored)), turns, mirrored)
                # a backend may hand back the same output buffer on every call: the sum is a copy
                y = out.clone() if y is None else y.add_(out)
            y = y.div_(len(views))
        return y[..., :height, :width].contiguous()
