"""The one-channel volume array the writers store."""

from __future__ import annotations

import numpy as np
import torch

from ldct_clip.errors import OutputError


def single_channel_array(volume, output_kind: str) -> np.ndarray:
    """``volume`` ((1, X, Y, Z) or (X, Y, Z), tensor or array) as an (X, Y, Z) numpy array.

    Args:
        volume: the volume to write.
        output_kind: the output format named in the error message ("DICOM", "NIfTI").
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise OutputError(
                f"volume has {array.shape[0]} channels; {output_kind} output takes one channel (1, X, Y, Z)"
            )
        array = array[0]
    if array.ndim != 3:
        raise OutputError(
            f"volume has shape {array.shape}; {output_kind} output takes (1, X, Y, Z) or (X, Y, Z)"
        )
    return array
