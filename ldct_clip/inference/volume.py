"""``denoise_volume``: the library's one call for a CT volume in memory, HU in, HU out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from torch import nn

from ldct_clip.conventions import ORIENTATION
from ldct_clip.errors import InputError
from ldct_clip.inference.backends import prepare_network
from ldct_clip.inference.device import default_batch_size, default_channels_last, resolve_amp, resolve_device
from ldct_clip.inference.inferers import CTSliceInferer
from ldct_clip.inference.predictor import PAD_MULTIPLE, SlicePredictor

__all__ = ["denoise_volume"]


def denoise_volume(
    volume_hu: torch.Tensor,
    model: nn.Module,
    *,
    device: str | torch.device | None = "auto",
    batch_size: int | None = None,
    amp: bool | str | torch.dtype | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.0,
    blend: str = "constant",
    axcodes: str | None = ORIENTATION,
    channels_last: bool | None = None,
    backend: str = "auto",
    inplace: bool = False,
    progress: bool = True,
    self_ensemble: bool = False,
) -> MetaTensor:
    """Denoise a CT volume in Hounsfield units, slice by slice; HU in, HU out.

    The same pieces the CT bundle's ``inference.json`` composes (the network run by its backend in a
    :class:`SlicePredictor` inside a :class:`CTSliceInferer`), for a volume already in memory. The volume stays where it is (host memory);
    batches of slices go to ``device`` and come back, converted to the model range and back on the fly.
    Voxels outside the scanner's field of view (padding values) come back unchanged.

    Args:
        volume_hu: ``(1, X, Y, Z)`` (or ``(X, Y, Z)``) float HU volume, a MetaTensor from
            :func:`ldct_clip.io.load_ct` or any tensor; slices are the last axis.
        model: the 2-D network mapping ``(B, 1, H, W)`` in the model range to the same.
        device: ``"auto"`` (GPU where there is one), ``"cpu"``, ``"cuda"``... where the network runs.
        batch_size: slices per network call; default 2 on a CPU, 16 on a GPU.
        amp: mixed precision, see :func:`resolve_amp`; None: the measured default for the device.
        roi_size: in-plane window; None: whole slices (the exact per-slice forward).
        overlap: window overlap in [0, 1) (with ``roi_size``; uses MONAI's SliceInferer).
        blend: ``"constant"`` or ``"gaussian"`` weighting of overlapping windows.
        axcodes: orientation the network sees the slices in (the training data's, ``"LPS"``: DICOM's
            display orientation); the output is returned in the input's orientation. None: as stored.
        channels_last: run the network in NHWC memory format; None: the measured default for the device.
        backend: how the network runs (:func:`~ldct_clip.inference.prepare_network`): ``"auto"`` measures the
            available backends once per machine and batch shape; or a name of ``BACKENDS``.
        inplace: overwrite ``volume_hu`` with the result (whole slices only) so that the volume is held in
            memory once.
        progress: tqdm bar over slices.
        self_ensemble: average over each slice's rotated and mirrored views (:class:`SlicePredictor`):
            better, and as many times slower as there are views (8 for square slices).

    Returns:
        MetaTensor of the input's shape (and leading channel), float32 HU, the input's affine and meta.
    """
    if (
        not isinstance(volume_hu, torch.Tensor)
        or volume_hu.ndim not in (3, 4)
        or (volume_hu.ndim == 4 and volume_hu.shape[0] != 1)
    ):
        shape = tuple(getattr(volume_hu, "shape", ()))
        raise InputError(f"denoise_volume needs a (1, X, Y, Z) or (X, Y, Z) volume, got shape {shape}")
    squeeze = volume_hu.ndim == 3
    volume = volume_hu[None] if squeeze else volume_hu
    if not isinstance(volume, MetaTensor):
        volume = MetaTensor(volume)
    if not volume.is_floating_point():
        volume = volume.float()
    compute_device = resolve_device(device)
    model = model.to(compute_device).eval()
    network = prepare_network(
        model,
        backend=backend,
        device=compute_device,
        amp_dtype=resolve_amp(amp, compute_device),
        channels_last=default_channels_last(compute_device) if channels_last is None else channels_last,
    )
    predictor = SlicePredictor(network, multiple=PAD_MULTIPLE, self_ensemble=self_ensemble)
    inferer = CTSliceInferer(
        sw_batch_size=batch_size or default_batch_size(compute_device),
        axcodes=axcodes,
        roi_size=roi_size,
        overlap=overlap,
        blend=blend,
        sw_device=compute_device,
        device=volume.device,
        progress=progress,
        inplace=inplace,
    )
    with torch.no_grad():
        denoised = inferer(volume[None], predictor)[0]
    out = MetaTensor(denoised.as_tensor() if isinstance(denoised, MetaTensor) else denoised)
    out = out.copy_meta_from(volume)
    return out[0] if squeeze else out
