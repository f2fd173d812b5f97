"""Checkpoints of the reference implementation (``CLIPDenoising`` of alwaysuu/CLIPDenoising, BasicSR).

The reference's state dict has the keys of :class:`~ldct_clip.networks.CLIPDenoiser` plus the
``encoder.layer4.*`` tensors it computes but never uses; those are dropped, everything else must fit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch

from ldct_clip.errors import WeightsError
from ldct_clip.networks.checkpoint import torch_load_file
from ldct_clip.networks.encoder import UNUSED_ENCODER_PREFIXES
from ldct_clip.networks.state_dict import check_state_dict_fits, name_some, strip_prefix

__all__ = ["REFERENCE_KEYS", "read_reference_checkpoint", "infer_network_config", "load_reference_state_dict"]

# BasicSR saves {"params": ...} or, with EMA, {"params": ..., "params_ema": ...}; the reference's test
# scripts load "params", so that is the default choice.
REFERENCE_KEYS = ("params", "params_ema")
_UNUSED = tuple("encoder." + p for p in UNUSED_ENCODER_PREFIXES)
_KNOWN_RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")


def _tensors(state_dict: Mapping) -> dict[str, torch.Tensor]:
    return strip_prefix({str(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}, "module.")


def read_reference_checkpoint(path: str | os.PathLike, key: str = "auto") -> dict[str, torch.Tensor]:
    """The network state dict of a BasicSR checkpoint of the reference code.

    Args:
        path: ``.pth`` file: ``{"params": sd}``, ``{"params_ema": sd}``, both, or a bare state dict.
            Loaded with ``weights_only=True``.
        key: ``"params"``, ``"params_ema"``, or ``"auto"``: ``"params"`` when present (what the
            reference test scripts load), else ``"params_ema"``, else the file is the state dict itself.

    Raises:
        WeightsError: unreadable file, or the requested entry is not there.
    """
    path = Path(path)
    if key not in ("auto", *REFERENCE_KEYS):
        raise WeightsError(f"key={key!r} is not one of auto, {', '.join(REFERENCE_KEYS)}")
    obj = torch_load_file(path, "reference checkpoint", "pass a complete BasicSR .pth file")
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict or BasicSR checkpoint")
    present = [k for k in REFERENCE_KEYS if isinstance(obj.get(k), Mapping)]
    if key != "auto":
        if key not in present:
            raise WeightsError(
                f"{path} has no {key!r} entry (it has {name_some(list(obj))}); choose another key"
            )
        return _tensors(obj[key])
    return _tensors(obj[present[0]]) if present else _tensors(obj)


def _blocks(state_dict: Mapping[str, torch.Tensor], stage: int) -> int:
    pattern = re.compile(rf"^encoder\.layer{stage}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_network_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """CLIPDenoiser constructor arguments that fit a reference (or our) state dict.

    ``in_channels`` from the presence of ``first.*``, ``out_channels`` from ``last.weight``, the stem
    width from ``encoder.conv3.weight``, the blocks per stage from the ``encoder.layerN.k`` indices,
    ``bias`` from ``last.bias``. When stages and width are those of an open_clip CLIP ResNet the result
    names it (``clip_model="RN50"``), otherwise it gives ``layers`` and ``width``.
    """
    state_dict = _tensors(state_dict)
    needed = ("encoder.conv1.weight", "encoder.conv3.weight", "last.weight")
    if any(k not in state_dict for k in needed):
        raise WeightsError(
            f"not a CLIPDenoising state dict: {name_some([k for k in needed if k not in state_dict])} "
            f"missing (found {name_some(list(state_dict))})"
        )
    width = int(state_dict["encoder.conv3.weight"].shape[0])
    layers = [_blocks(state_dict, stage) for stage in (1, 2, 3, 4)]
    if not all(layers[:3]):
        raise WeightsError("not a CLIPDenoising state dict: encoder.layer1..3 blocks are missing")
    config = {
        "in_channels": 1
        if "first.weight" in state_dict
        else int(state_dict["encoder.conv1.weight"].shape[1]),
        "out_channels": int(state_dict["last.weight"].shape[0]),
        "bias": "last.bias" in state_dict,
    }
    for name in _KNOWN_RESNETS:
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        known = list(vision.get("layers", []))
        if vision.get("width") == width and known[:3] == layers[:3] and layers[3] in (0, known[3]):
            return {**config, "clip_model": name}
    # layer4 is not part of the network; without it in the file its block count is irrelevant.
    return {**config, "layers": [*layers[:3], layers[3] or 1], "width": width}


def load_reference_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a reference ``CLIPDenoising`` state dict into a :class:`~ldct_clip.networks.CLIPDenoiser`.

    ``encoder.layer4.*`` (and an ``encoder.attnpool.*``, if any) are dropped; a ``module.`` prefix is
    removed. Everything else must match the model key for key and shape for shape.

    Raises:
        WeightsError: naming the missing, unexpected and shape-mismatched keys.
    """
    used = {k: v for k, v in _tensors(state_dict).items() if not k.startswith(_UNUSED)}
    check_state_dict_fits(
        model.state_dict(), used, "reference state dict tensors", optional_suffixes=("num_batches_tracked",)
    )
    model.load_state_dict(used, strict=False)
