"""CLIPDenoiser: frozen CLIP ResNet taps + learnable decoder (Cheng, Liang, Tan, CVPR 2024)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ldct_clip.errors import InputError
from ldct_clip.networks.clip_weights import (
    load_encoder_weights,
    read_encoder_state_dict,
    resolve_encoder_weights,
)
from ldct_clip.networks.decoder import conv3x3_by_taps, make_up_path
from ldct_clip.networks.encoder import CLIPDenseEncoder, resolve_resnet_config

__all__ = ["CLIPDenoiser", "ENCODER_BN_MODES", "SIZE_MULTIPLE", "pad_to_multiple", "reflect_indices"]

ENCODER_BN_MODES = ("batch_stats", "frozen")
# layer3 is at 1/16 resolution: every tap then has exactly twice the size of the next deeper one.
SIZE_MULTIPLE = 16


def reflect_indices(size: int, target: int, device: torch.device) -> torch.Tensor:
    """Indices ``0..target-1`` folded into ``0..size-1`` as numpy's ``reflect`` padding folds them.

    numpy reflects again and again where the pad exceeds the size, which repeats one period
    ``0, 1, ..., size-1, size-2, ..., 1``; a size-1 axis has nothing to reflect and is repeated. Built from
    ``arange``, ``cat`` and ``repeat`` of sizes only (no arithmetic on index values), so it traces and
    exports to ONNX with dynamic sizes.
    """
    back = torch.arange(1, max(size - 1, 1), device=device).flip(0)  # size-2, ..., 1 (none for size < 3)
    period = torch.cat([torch.arange(size, device=device), back])
    repeats = (target + period.shape[0] - 1) // period.shape[0]
    return period.repeat(repeats)[:target]


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad the bottom/right of a (B, C, H, W) tensor up to a multiple of ``multiple``.

    The padding is at the end of each axis, as the reference evaluation scripts pad. ``torch``'s reflect
    mode needs a pad smaller than the size; this pads any size as numpy's ``reflect`` does (see
    :func:`reflect_indices`; a size-1 axis is replicated), by gathering rows and columns, which is a
    copy like ``F.pad`` and exports to ONNX with dynamic height and width. An input that needs no
    padding is returned as it is (except while exporting, whose graph must serve every size).
    """
    height, width = x.shape[-2], x.shape[-1]
    padded_height = (height + multiple - 1) // multiple * multiple
    padded_width = (width + multiple - 1) // multiple * multiple
    nothing_to_pad = padded_height == height and padded_width == width
    if not torch.jit.is_scripting():
        # An exported graph serves every size: it always gathers (the identity where nothing is padded).
        nothing_to_pad = nothing_to_pad and not torch.compiler.is_exporting()
    if nothing_to_pad:
        return x
    x = x.index_select(-2, reflect_indices(height, padded_height, x.device))
    return x.index_select(-1, reflect_indices(width, padded_width, x.device))


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

    # TorchScript: compile-time constants; ``sigmas`` is Python-only (a variadic tuple).
    __constants__ = ["in_channels", "size_multiple"]
    __jit_unused_properties__ = ["sigmas"]
    size_multiple = SIZE_MULTIPLE

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
        if hasattr(self, "first"):  # hasattr, not in_channels: TorchScript resolves it when compiling
            if torch.jit.is_scripting():
                x = self.first(x)
            else:
                x = self._first_conv(x)
        if self.in_channels == 3 and not x.requires_grad:
            # Nothing before the frozen encoder learns: keeping its activations for backward is wasted memory.
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def augment(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Progressive feature augmentation: multiplicative Gaussian noise on taps 1..4, in that order."""
        out = [taps[0]]
        for i in range(1, len(taps)):
            # sigma_i = i * aug_level, as :attr:`sigmas` lists them
            out.append(taps[i] * (torch.randn_like(taps[i]) * (i * self.aug_level) + 1.0))
        return out

    def decode(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The decoder (without ``last``): step 0 on the deepest tap, then each step with the next
        shallower tap as skip (:func:`ldct_clip.networks.decoder.run_up_path`, inside the module so that
        TorchScript compiles it)."""
        x = taps[-1]
        for i, step in enumerate(self.up_path):
            x = step(x) if i == 0 else step(x, taps[-1 - i])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"CLIPDenoiser expects a (B, {self.in_channels}, H, W) tensor, got shape {list(x.shape)}"
            )
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple)
        taps = self.encode(padded)
        if self.training:
            taps = self.augment(taps)
        y = self.decode(taps)
        if torch.jit.is_scripting():
            y = self.last(y)
        else:
            y = self._output_conv(y)
        return y[..., :height, :width]

    # Under autocast, ``first`` and ``last`` run in float32, as in :meth:`infer`, so that training computes
    # what inference runs. In bf16 they round the input and output images to 8 bits of mantissa (~8 HU
    # steps) and the 1x1 conv's three weights with them, a fixed gain error: weights trained that way
    # came out 1.3-1.7 HU too bright in inference (benchmarks/README.md).
    @torch.jit.unused
    def _first_conv(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return self.first(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.first(x.float())

    @torch.jit.unused
    def _output_conv(self, y: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(y.device.type):
            return self.last(y)
        with torch.autocast(y.device.type, enabled=False):
            return self.last(y.float())

    @torch.jit.unused
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward: :meth:`forward` in eval mode with less work around the convolutions.

        Same result up to float rounding (the backends in :mod:`ldct_clip.inference.backends` are tested
        against :meth:`forward` with the shipped weights): ``first`` (1x1 conv from one channel) is a
        broadcast multiply, ``last`` (3x3 conv to one channel, slow in oneDNN) goes through
        :func:`~ldct_clip.networks.decoder.conv3x3_by_taps`, the decoder's activations are in place, and
        the image tap is laid out like the network's weights (NHWC networks get NHWC taps, so that the
        concatenation does not fall back to NCHW). Under autocast, ``last`` still runs in float32. No feature
        augmentation: call it in eval mode, under ``torch.no_grad()`` or ``torch.inference_mode()``
        (in-place activations).
        """
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.size_multiple)
        if hasattr(self, "first"):
            x = x * self.first.weight.view(1, -1, 1, 1)
            if self.first.bias is not None:
                x = x + self.first.bias.view(1, -1, 1, 1)
        if self.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        taps = self.encoder(x)
        y = taps[-1]
        for i, step in enumerate(self.up_path):
            y = step.infer(y, None if i == 0 else taps[-1 - i])
        # The output conv in float32 even under autocast: a bf16 output rounds the image to 8 bits of
        # mantissa (~8 HU), which is most of what bf16 costs in PSNR (benchmarks/README.md).
        with torch.autocast(y.device.type, enabled=False):
            y = conv3x3_by_taps(y.float(), self.last.weight.float(), self.last.bias)
        return y[..., :height, :width]
