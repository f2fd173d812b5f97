"""The trained network for inference, from a checkpoint file."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ldct_clip.errors import WeightsError
from ldct_clip.inference.device import resolve_device
from ldct_clip.networks import load_checkpoint, load_model, load_model_weights

__all__ = ["load_denoiser"]


def load_denoiser(
    ckpt_path: str | os.PathLike,
    network_def: nn.Module | Callable[[], nn.Module] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The network for inference, in eval mode on ``device``, from a checkpoint file.

    A checkpoint written by ldct-clip (``save_checkpoint``, ``ldct-clip train`` or ``import-reference``)
    rebuilds its own architecture; a bare state dict or ``{"model": state_dict}`` (MONAI
    ``CheckpointSaver``) is loaded into ``network_def``.

    Args:
        ckpt_path: the weights file.
        network_def: network (or a function building it, called only when needed) to load a bare state
            dict into; ignored for ldct-clip checkpoints.
        device: where the network is put.

    Raises:
        WeightsError: missing/unreadable file, or weights that fit neither the checkpoint's own
            architecture nor ``network_def``.
    """
    checkpoint = load_checkpoint(ckpt_path)
    if isinstance(checkpoint.get("network"), Mapping):
        model = load_model(ckpt_path)
    elif network_def is not None:
        if not isinstance(network_def, nn.Module):
            network_def = network_def()
        model = load_model_weights(network_def, checkpoint)
    else:
        raise WeightsError(
            f"{ckpt_path} is a bare state dict without the network's configuration; give the network it "
            "belongs to (the bundle's network_def) or re-save it with ldct_clip.networks.save_checkpoint"
        )
    return model.to(resolve_device(device)).eval()
