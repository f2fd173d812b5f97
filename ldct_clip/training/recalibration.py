"""Re-estimating the encoder's BatchNorm statistics on full slices after training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ldct_clip.errors import InputError
from ldct_clip.networks import pad_to_multiple

__all__ = ["recalibrate_encoder_bn"]


def recalibrate_encoder_bn(
    model: nn.Module,
    slices: Iterable[torch.Tensor],
    multiple: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> int:
    """Re-estimates the running statistics of the encoder's BatchNorm layers on full slices.

    Why: with ``encoder_bn="batch_stats"`` (the paper) the encoder's BatchNorm runs on batch statistics
    in training and its running statistics drift towards those of the training crops (128^2); inference
    (eval mode) then normalises full slices (512^2, more air and table, different feature statistics)
    with them. This replaces them with statistics of ``slices``: the running statistics are reset and
    accumulated with ``momentum=None`` (PyTorch's cumulative average of the per-batch statistics) while
    the encoder sees each batch of slices, padded as at inference. Nothing else changes (no weights, no
    decoder, no feature augmentation). Only for ``encoder_bn="batch_stats"``: a ``"frozen"`` encoder keeps
    CLIP's own statistics. ``benchmarks/encoder_bn_recalibration.py`` measures the effect.

    Args:
        model: a ``CLIPDenoiser`` (or a DDP wrapper of one).
        slices: (B, C, H, W) batches in the model range, typically the training patients' full slices.
        multiple: padding multiple, as at inference (32).
        device: where to run (default: the model's device).
        progress: show a tqdm bar.

    Returns:
        the number of slices seen.

    Raises:
        InputError: a ``"frozen"`` encoder, or no slices.
    """
    model = getattr(model, "module", model)
    if getattr(model, "encoder_bn", "batch_stats") == "frozen":
        raise InputError(
            "encoder_bn='frozen' keeps CLIP's BatchNorm statistics; recalibration is for 'batch_stats'"
        )
    layers = [m for m in model.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.train()
        with torch.no_grad():
            for batch in tqdm(
                slices, desc="encoder BatchNorm statistics", unit="batch", disable=not progress
            ):
                x = torch.as_tensor(batch, dtype=torch.float32, device=device)
                model.encode(pad_to_multiple(x, multiple))
                seen += x.shape[0]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise InputError("no slices to re-estimate the encoder's BatchNorm statistics on")
    return seen
