"""CLIPDenoiser: frozen CLIP ResNet taps + learnable decoder (Cheng, Liang, Tan, CVPR 2024)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldct_clip.errors import InputError
from ldct_clip.networks.clip_weights import (
    load_encoder_weights,
    read_encoder_state_dict,
    resolve_encoder_weights,
)
from ldct_clip.networks.decoder import make_up_path, run_up_path
from ldct_clip.networks.encoder import CLIPDenseEncoder, resolve_resnet_config

__all__ = ["CLIPDenoiser", "ENCODER_BN_MODES", "pad_to_multiple"]

ENCODER_BN_MODES = ("batch_stats", "frozen")
# layer3 is at 1/16 resolution: every tap then has exactly twice the size of the next deeper one.
SIZE_MULTIPLE = 16


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad the bottom/right of a (B, C, H, W) tensor up to a multiple of ``multiple``.

    The padding is at the end of each axis, as the reference evaluation scripts pad. ``torch``'s reflect
    mode needs a pad smaller than the size, so tiny inputs are reflected in several steps (as numpy's
    ``reflect`` does); a size-1 axis has nothing to reflect and is replicated. Reflection is separable,
    so padding the axes one after the other equals padding both at once.
    """
    for dim in (-2, -1):
        pad = -x.shape[dim] % multiple
        while pad:
            size = x.shape[dim]
            step = pad if size == 1 else min(pad, size - 1)
            pads = (0, step, 0, 0) if dim == -1 else (0, 0, 0, step)
            x = F.pad(x, pads, mode="replicate" if size == 1 else "reflect")
            pad -= step
    return x


class CLIPDenoiser(nn.Module):
    """The CLIP-feature denoiser of "Transfer CLIP for Generalizable Image Denoising".

    A frozen CLIP ResNet image tower (open_clip's ``ModifiedResNet`` up to layer3) gives five dense
    taps (input, stem, layer1, layer2, layer3); a learnable decoder maps them to the clean image (direct
    prediction). One-channel input (CT) goes through a learnable 1x1 conv to 3 channels first; its output
    is also the full-resolution tap. In training, taps 1..4 are multiplied by ``1 + sigma_i * N(0, 1)``
    with ``sigma_i = i * aug_level`` (progressive feature augmentation); the image tap is untouched.

    Module names match the reference ``CLIPDenoising`` (``first``, ``encoder``, ``up_path``, ``last``), so
    its checkpoints load key for key (see :func:`ldct_clip.networks.load_reference_state_dict`).

    Args:
        in_channels: 1 (CT, adds the 1x1 conv ``first``) or 3 (RGB).
        out_channels: channels predicted.
        clip_model: open_clip ResNet architecture (``"RN50"``, ``"RN101"``, ``"RN50x4"``...).
        layers: blocks per ResNet stage, overriding ``clip_model``'s (e.g. ``(1, 1, 1, 1)`` for tests).
        width: ResNet stem width, overriding ``clip_model``'s (64 for RN50).
        encoder_weights: ``None`` (random init, open_clip's), an open_clip pretrained tag of
            ``clip_model`` (``"openai"``: the paper) or a path to a CLIP weight file. Loaded strictly.
        decoder_depth: decoder steps; the encoder gives five taps, so this must be 5.
        bias: bias in the decoder convs, ``first`` and ``last`` (the paper's configs: False).
        aug_level: feature augmentation strength (0.025 CT/synthetic, 0.05 sRGB in the paper; 0 = off).
        encoder_bn: ``"batch_stats"``: the encoder's BatchNorm follows ``train()``/``eval()`` like the
            reference (batch statistics in training, running statistics updated though no weight ever
            changes); ``"frozen"``: the encoder always runs in eval mode and its statistics never move.
            Encoder parameters never require gradients in either mode.
        encoder_sha256: optional SHA-256 of the encoder weight file, checked before loading.
        cache_dir: open_clip/Hugging Face cache directory for tags (``None``: their defaults).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        clip_model: str = "RN50",
        layers: Sequence[int] | None = None,
        width: int | None = None,
        encoder_weights: str | os.PathLike | None = None,
        decoder_depth: int = 5,
        bias: bool = False,
        aug_level: float = 0.025,
        encoder_bn: str = "batch_stats",
        encoder_sha256: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise InputError(
                f"in_channels={in_channels!r} is not supported: use 1 (CT, through a learnable 1x1 conv) "
                "or 3 (RGB); CLIP's image tower takes 3 channels"
            )
        if not isinstance(out_channels, int) or out_channels < 1:
            raise InputError(f"out_channels={out_channels!r} must be a positive int")
        if decoder_depth != 5:
            raise InputError(
                f"decoder_depth={decoder_depth!r} is not supported: the encoder gives 5 taps "
                "(input, stem, layer1, layer2, layer3), so the decoder has 5 steps; use 5"
            )
        if encoder_bn not in ENCODER_BN_MODES:
            raise InputError(f"encoder_bn={encoder_bn!r} is not one of {', '.join(ENCODER_BN_MODES)}")
        if not isinstance(aug_level, (int, float)) or aug_level < 0:
            raise InputError(f"aug_level={aug_level!r} must be a number >= 0 (0 switches augmentation off)")
        layers, width = resolve_resnet_config(clip_model, layers, width)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.aug_level = float(aug_level)
        self.encoder_bn = encoder_bn
        # Constructor arguments a checkpoint needs to rebuild the network (weights travel in the state).
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "clip_model": clip_model,
            "layers": list(layers),
            "width": width,
            "decoder_depth": decoder_depth,
            "bias": bool(bias),
            "aug_level": self.aug_level,
            "encoder_bn": encoder_bn,
        }

        if in_channels == 1:
            self.first = nn.Conv2d(1, 3, kernel_size=1, bias=bias)
        self.encoder = CLIPDenseEncoder(layers, width)
        if encoder_weights is not None:
            path = resolve_encoder_weights(clip_model, encoder_weights, cache_dir=cache_dir)
            state = read_encoder_state_dict(path, sha256=encoder_sha256)
            load_encoder_weights(self.encoder, state, source=f"CLIP encoder weights from {path}")
        self.encoder.requires_grad_(False)

        self.up_path, decoder_channels = make_up_path(self.encoder.tap_channels, slope=0.2, bias=bias)
        self.last = nn.Conv2d(decoder_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.train(self.training)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Feature-augmentation noise level of taps 1..4."""
        return tuple(i * self.aug_level for i in range(1, 5))

    def train(self, mode: bool = True) -> CLIPDenoiser:
        super().train(mode)
        if self.encoder_bn == "frozen":
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder taps of a (B, C, H, W) input whose H, W are multiples of 16."""
        if self.in_channels == 1:
            x = self.first(x)
        if self.in_channels == 3 and not x.requires_grad:
            # Nothing before the frozen encoder learns: keeping its activations for backward is wasted memory.
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def augment(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Progressive feature augmentation: multiplicative Gaussian noise on taps 1..4, in that order."""
        out = [taps[0]]
        for tap, sigma in zip(taps[1:], self.sigmas):
            out.append(tap * (torch.randn_like(tap) * sigma + 1.0))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"CLIPDenoiser expects a (B, {self.in_channels}, H, W) tensor, got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, SIZE_MULTIPLE)
        taps = self.encode(padded)
        if self.training:
            taps = self.augment(taps)
        y = self.last(run_up_path(self.up_path, taps))
        return y[..., :height, :width]
