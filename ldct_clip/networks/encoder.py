"""The frozen CLIP image tower as a dense feature extractor (five taps, no layer4, no attention pool)."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet

from ldct_clip.errors import InputError

__all__ = ["CLIPDenseEncoder", "resnet_clip_models", "resolve_resnet_config"]

# Parameter-free prefixes of open_clip's ModifiedResNet that the dense encoder removes: the reference
# computes layer4 and throws its output away; the attention pool is never used.
UNUSED_ENCODER_PREFIXES = ("layer4.", "attnpool.")


def resnet_clip_models() -> list[str]:
    """Names of the open_clip architectures whose image tower is a ModifiedResNet (RN50, RN101, ...)."""
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision = cfg.get("vision_cfg", {})
        if isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name"):
            names.append(name)
    return names


def resolve_resnet_config(
    clip_model: str, layers: Sequence[int] | None = None, width: int | None = None
) -> tuple[tuple[int, int, int, int], int]:
    """Blocks per stage and stem width: from open_clip's config of ``clip_model``, overridden if given.

    Args:
        clip_model: open_clip architecture name, e.g. ``"RN50"``. Only read where ``layers`` or ``width``
            is ``None``.
        layers: four ints, the residual blocks per stage (open_clip's ``vision_cfg["layers"]``).
        width: the stem width (64 for RN50).

    Raises:
        InputError: unknown or non-ResNet ``clip_model`` while it is needed, or malformed overrides.
    """
    if layers is None or width is None:
        cfg = open_clip.get_model_config(clip_model) if isinstance(clip_model, str) else None
        vision = (cfg or {}).get("vision_cfg", {})
        if not isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name"):
            raise InputError(
                f"clip_model={clip_model!r} is not an open_clip CLIP ResNet; use one of "
                f"{', '.join(resnet_clip_models())} (or give layers=(a, b, c, d) and width=N)"
            )
        layers = vision["layers"] if layers is None else layers
        width = vision["width"] if width is None else width
    layers = tuple(layers)
    if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise InputError(f"layers={layers!r} must be four positive ints, the ResNet blocks per stage")
    if not isinstance(width, int) or width < 2 or width % 2:
        raise InputError(f"width={width!r} must be an even int >= 2 (the ResNet stem width, 64 for RN50)")
    return layers, width  # type: ignore[return-value]


class CLIPDenseEncoder(ModifiedResNet):
    """open_clip's ``ModifiedResNet`` cut after layer3, returning the five dense taps of the paper.

    Taps: the 3-channel input itself; the stem after ``act3`` (``width`` channels, 1/2 resolution, before
    the stem's average pool); layer1 (4*width, 1/4); layer2 (8*width, 1/8); layer3 (16*width, 1/16).
    ``layer4`` and ``attnpool`` are deleted after construction, so they are neither computed nor part of
    the state dict. Parameter names are open_clip's (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ...),
    so the ``visual.*`` weights of a CLIP checkpoint fit key for key.

    Args:
        layers: residual blocks in each of the four stages (the fourth only shapes the deleted layer4).
        width: stem width.
    """

    def __init__(self, layers: Sequence[int], width: int) -> None:
        # output_dim/heads only shape the attention pool, which is deleted right away.
        super().__init__(list(layers), output_dim=width * 8, heads=1, image_size=32, width=width)
        del self.layer4
        del self.attnpool
        self.width = width
        self.tap_channels = (3, width, 4 * width, 8 * width, 16 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        x = x.to(self.conv1.weight.dtype)
        taps = [x]
        # open_clip's stem() ends with the average pool; the paper taps the features right before it.
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        taps.append(x)
        x = self.layer1(self.avgpool(x))
        taps.append(x)
        x = self.layer2(x)
        taps.append(x)
        taps.append(self.layer3(x))
        return taps
