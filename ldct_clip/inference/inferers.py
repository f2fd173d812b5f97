"""Slice-by-slice inference of the 2-D network over CT volumes, as MONAI inferers.

- :class:`SliceBatchInferer` streams batches of whole slices from a host-memory volume to the compute device
  and writes each result straight into one preallocated output (or over the input).
- :class:`CTSliceInferer` is what the CT bundle runs: HU volume in, HU volume out. It shows the network
  every slice in the training orientation (:data:`ldct_clip.conventions.ORIENTATION`) and in the model
  range, converting each batch on the fly (flips and ``x = (HU + 1024) / 4096``), so no reoriented or
  normalised copy of the volume is ever made; field-of-view padding comes back unchanged. Whole slices go
  through :class:`SliceBatchInferer`; ``roi_size``/``overlap`` windows through MONAI's ``SliceInferer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import nibabel as nib
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer
from monai.transforms import Orientation
from monai.utils import BlendMode
from tqdm.auto import tqdm

from ldct_clip.conventions import (
    AIR_HU,
    FOV_PADDING_THRESHOLD_HU,
    HU_RANGE,
    ORIENTATION,
    hu_to_model,
    model_to_hu,
)
from ldct_clip.errors import InputError
from ldct_clip.inference.memory import bounded_batch_size

__all__ = ["CTSliceInferer", "HUBatchConversion", "ImageInferer", "SliceBatchInferer", "make_inferer"]


class SliceBatchInferer(Inferer):
    """Slice-by-slice inference of a 2-D network over a volume, streaming batches of whole slices.

    ``inputs`` is ``(N, C, X, Y, Z)``; slices are taken along ``spatial_dim`` (2: the last axis, axial
    slices of a CT volume in MONAI's layout). Each batch of ``sw_batch_size`` slices is copied to
    ``sw_device``, predicted, and written into an output preallocated on ``device``.

    Why not MONAI's SliceInferer for this: its SlidingWindowInferer core allocates, besides the output, a
    count/importance map the size of the volume and divides the output by it at the end (plus a temporary
    of the output size). With whole-slice windows and no overlap that map is all ones, so it only costs
    memory: 1.2 GB extra for a 512x512x600 float32 volume. :func:`make_inferer` still hands out
    SliceInferer when overlapping windows and blending are asked for.

    Args:
        sw_batch_size: slices per network call.
        spatial_dim: spatial axis of ``inputs`` to slice along (0, 1 or 2).
        sw_device: device the network runs on; default the input's device.
        device: device of the output (stitching); default the input's device.
        progress: show a tqdm bar over slices.
        inplace: write the predictions over ``inputs`` (same channels, floating point) instead of into a
            new output, so that the volume is held only once; safe because every batch of slices is read
            before it is written.
    """

    def __init__(
        self,
        sw_batch_size: int = 1,
        spatial_dim: int = 2,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        inplace: bool = False,
    ) -> None:
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        if spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2, got {spatial_dim}.")
        self.sw_batch_size = int(sw_batch_size)
        self.spatial_dim = spatial_dim
        self.sw_device = sw_device
        self.device = device
        self.progress = progress
        self.inplace = inplace

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: ``(N, C, X, Y, Z)`` volume batch, on any device (normally host memory).
            network: 2-D predictor, ``(B, C, H, W) -> (B, C_out, H, W)``.
            args: optional args passed to ``network``.
            kwargs: optional keyword args passed to ``network``.
        """
        if inputs.ndim != 5:
            raise ValueError(
                f"SliceBatchInferer needs a (N, C, X, Y, Z) input, got shape {tuple(inputs.shape)}."
            )
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        device = torch.device(self.device) if self.device is not None else inputs.device
        axis = self.spatial_dim + 2
        n_slices = inputs.shape[axis]
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        output: torch.Tensor | None = None
        if self.inplace:
            if not data.is_floating_point():
                raise ValueError(f"inplace inference needs a floating-point input, got {data.dtype}.")
            output = data
        bar = tqdm(
            total=inputs.shape[0] * n_slices, unit="slice", desc="denoising", disable=not self.progress
        )
        with bar:
            for item in range(inputs.shape[0]):
                for start in range(0, n_slices, self.sw_batch_size):
                    count = min(self.sw_batch_size, n_slices - start)
                    # (C, ..., k, ...) -> (k, C, H, W): the slices become the batch
                    window = data[item].narrow(axis - 1, start, count).movedim(axis - 1, 0)
                    window = window.to(sw_device, non_blocking=True).contiguous()
                    pred = network(window, *args, **kwargs)
                    if self.inplace and pred.shape[1] != data.shape[1]:
                        raise ValueError(
                            f"inplace inference needs as many output channels as input channels, "
                            f"got {pred.shape[1]} for {data.shape[1]}."
                        )
                    if output is None:
                        shape = list(inputs.shape)
                        shape[1] = pred.shape[1]
                        # allocated outside any inference_mode the caller may use later (writers edit in place)
                        with torch.inference_mode(False):
                            output = torch.empty(shape, dtype=pred.dtype, device=device)
                    output[item].narrow(axis - 1, start, count).copy_(pred.movedim(0, axis - 1))
                    bar.update(count)
        if output is None:  # zero slices
            output = torch.empty(inputs.shape, dtype=inputs.dtype, device=device)
        if isinstance(inputs, MetaTensor):
            output = MetaTensor(output).copy_meta_from(inputs, copy_attr=False)
        return output


class HUBatchConversion:
    """HU to the model range and back for one batch of slices, on the fly.

    Field-of-view padding (below ``padding_threshold``) is shown to the network as air and gets its input
    value back afterwards.

    Args:
        hu_range: HU interval of the model range (:data:`ldct_clip.conventions.HU_RANGE`).
        padding_threshold: values below are padding; None: no padding handling.
        air_hu: the value padding is shown as.
    """

    def __init__(
        self,
        hu_range: Sequence[float] = HU_RANGE,
        padding_threshold: float | None = FOV_PADDING_THRESHOLD_HU,
        air_hu: float = AIR_HU,
    ) -> None:
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.padding_threshold = padding_threshold
        self.air_hu = float(air_hu)

    def to_model(self, hu: torch.Tensor) -> torch.Tensor:
        if self.padding_threshold is not None:
            hu = torch.where(hu < self.padding_threshold, torch.as_tensor(self.air_hu, dtype=hu.dtype), hu)
        return hu_to_model(hu, self.hu_range)

    def to_hu(self, x: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        out = model_to_hu(x, self.hu_range)
        if self.padding_threshold is not None:
            out = torch.where(hu < self.padding_threshold, hu.to(out.dtype), out)
        return out


class _OrientedHUNetwork:
    """The network as a CT batch sees it: flips to the training orientation and HU <-> model range."""

    def __init__(self, network: Callable, conversion: HUBatchConversion | None, flip_dims: tuple[int, ...]):
        self.network = network
        self.conversion = conversion
        self.flip_dims = flip_dims

    def __call__(self, hu: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.conversion.to_model(hu) if self.conversion is not None else hu
        x = x.float()
        if self.flip_dims:
            x = x.flip(self.flip_dims)
        y = self.network(x, *args, **kwargs)
        y = y.flip(self.flip_dims) if self.flip_dims else y
        return self.conversion.to_hu(y, hu) if self.conversion is not None else y


def orientation_plan(affine: torch.Tensor, axcodes: str | None) -> tuple[str, tuple[int, ...] | None]:
    """How to show the slices of a volume with ``affine`` in ``axcodes``: ``(current codes, flips)``.

    ``flips`` are the in-plane batch dims (-2, -1) to flip when the axes only differ in direction (every
    axial series and volume), or None when the axes must be permuted (a full reorientation).
    """
    current = "".join(nib.aff2axcodes(torch.as_tensor(affine).detach().cpu().numpy()))
    if axcodes is None or current == axcodes:
        return current, ()
    opposite = dict(zip("LRPAIS", "RLAPSI"))
    if all(c in (t, opposite[t]) for c, t in zip(current, axcodes)):
        return current, tuple(dim for dim, c, t in zip((-2, -1), current[:2], axcodes[:2]) if c != t)
    return current, None


class CTSliceInferer(Inferer):
    """HU volumes in, HU volumes out: each slice shown to the network in ``axcodes`` and the model range.

    ``inputs`` is a ``(N, 1, X, Y, Z)`` HU batch (a MetaTensor whose affine gives the orientation; a plain
    tensor is taken as already oriented). Slices are the last axis. Orientation: when the volume's axes
    only differ from ``axcodes`` in direction, each batch of slices is flipped on the way in and back on the
    way out (the order of the slices does not matter to a 2-D network); otherwise the volume is reoriented
    with MONAI's ``Orientation`` and back. Each batch is converted to the model range and back on the fly
    (:class:`HUBatchConversion`).

    Args:
        sw_batch_size: slices per network call, at most; reduced for a volume whose slices would not fit
            the memory budget (:func:`~ldct_clip.inference.memory.bounded_batch_size`, which logs it).
        axcodes: orientation the network sees (default :data:`ldct_clip.conventions.ORIENTATION`); None: as
            stored.
        roi_size: in-plane window ``(H, W)``; None or non-positive sides: whole slices (the exact per-slice
            forward, streamed by :class:`SliceBatchInferer`).
        overlap: overlap of windows in [0, 1) (with ``roi_size``; MONAI's ``SliceInferer``).
        blend: ``"constant"`` or ``"gaussian"`` weighting of overlapping windows.
        sigma_scale: Gaussian sigma as a fraction of the window, for ``blend="gaussian"``.
        sw_device: device the network runs on.
        device: device of the output volume (host memory by default, so any volume fits the GPU).
        progress: show a progress bar over slices.
        inplace: whole slices only: write the result over the input, so that the volume is held once (for
            callers that no longer need the noisy volume).
        hu_conversion: the per-batch HU <-> model conversion (default :class:`HUBatchConversion`).
    """

    def __init__(
        self,
        sw_batch_size: int = 1,
        axcodes: str | None = ORIENTATION,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.0,
        blend: str = "constant",
        sigma_scale: float = 0.125,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = "cpu",
        progress: bool = False,
        inplace: bool = False,
        hu_conversion: HUBatchConversion | None = None,
    ) -> None:
        self.axcodes = axcodes
        self.batch_size = int(sw_batch_size)
        self.window = (
            tuple(int(r) for r in roi_size)
            if roi_size is not None and all(int(r) > 0 for r in roi_size)
            else None
        )
        self.conversion = hu_conversion if hu_conversion is not None else HUBatchConversion()
        self.slicer = make_inferer(
            sw_batch_size=sw_batch_size,
            roi_size=roi_size,
            overlap=overlap,
            blend=blend,
            sigma_scale=sigma_scale,
            spatial_dim=2,
            sw_device=sw_device,
            device=device,
            progress=progress,
            inplace=inplace,
        )

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """
        Args:
            inputs: ``(N, 1, X, Y, Z)`` HU, or one ``(1, X, Y, Z)`` volume; normally a MetaTensor in host memory.
            network: 2-D predictor in the model range, e.g. :class:`~ldct_clip.inference.SlicePredictor`.

        Returns:
            the denoised HU volume(s), shaped and oriented like ``inputs``, with its meta.
        """
        if inputs.ndim not in (4, 5):
            raise ValueError(
                f"CTSliceInferer needs a (N, 1, X, Y, Z) batch or a (1, X, Y, Z) volume, got {tuple(inputs.shape)}."
            )
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if not data.is_floating_point():
            data = data.float()
        affines = getattr(inputs, "affine", None)
        if inputs.ndim == 4:
            out = self._one(data[None], affines, network, *args, **kwargs)[0]
        else:
            if affines is not None and affines.ndim == 2:
                affines = affines[None].expand(data.shape[0], 4, 4)
            outs = [
                self._one(data[i : i + 1], None if affines is None else affines[i], network, *args, **kwargs)
                for i in range(data.shape[0])
            ]
            out = (
                outs[0] if len(outs) == 1 else torch.cat(outs)
            )  # one volume: no copy (inplace stays in place)
        return (
            MetaTensor(out).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else out
        )

    def _one(
        self, volume: torch.Tensor, affine: torch.Tensor | None, network: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """One ``(1, 1, X, Y, Z)`` plain tensor with its ``(4, 4)`` affine (None: already oriented)."""
        height, width = self.window or volume.shape[-3:-1]
        device = self.slicer.sw_device or volume.device
        self.slicer.sw_batch_size = bounded_batch_size(self.batch_size, int(height), int(width), device)
        current, flips = orientation_plan(affine, self.axcodes) if affine is not None else ("", ())
        if flips is not None:
            return self.slicer(volume, _OrientedHUNetwork(network, self.conversion, flips), *args, **kwargs)
        # the axes must be permuted: reorient a copy and back (rare: sagittal or coronal stacks)
        oriented = Orientation(axcodes=self.axcodes, labels=None)(MetaTensor(volume[0], affine=affine))
        pred = self.slicer(
            oriented.as_tensor()[None], _OrientedHUNetwork(network, self.conversion, ()), *args, **kwargs
        )
        back = Orientation(axcodes=current, labels=None)(MetaTensor(pred[0], affine=oriented.affine))
        return back.as_tensor()[None]


def make_inferer(
    *,
    sw_batch_size: int = 1,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.0,
    blend: str = "constant",
    sigma_scale: float = 0.125,
    spatial_dim: int = 2,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = "cpu",
    progress: bool = False,
    inplace: bool = False,
) -> Inferer:
    """The inferer for slice-wise inference: streaming whole slices, or MONAI's SliceInferer for windows.

    Args:
        sw_batch_size: slices (or windows) per network call.
        roi_size: in-plane window ``(H, W)``; None or non-positive sides mean the whole slice.
        overlap: overlap of neighbouring windows, in [0, 1).
        blend: ``"constant"`` or ``"gaussian"`` weighting of overlapping windows.
        sigma_scale: Gaussian sigma as a fraction of the window, for ``blend="gaussian"``.
        spatial_dim: spatial axis to slice along (2: axial slices of a (C, X, Y, Z) CT volume).
        sw_device: device the network runs on.
        device: device of the output volume (host memory by default, so any volume size fits the GPU).
        progress: show a progress bar.
        inplace: whole slices without overlap only: write the result over the input (see
            :class:`SliceBatchInferer`); ignored for windows, which need the blending buffers anyway.
    """
    blend = BlendMode(blend).value
    whole_slice = roi_size is None or all(int(r) <= 0 for r in roi_size)
    if whole_slice and overlap == 0.0:
        return SliceBatchInferer(
            sw_batch_size=sw_batch_size,
            spatial_dim=spatial_dim,
            sw_device=sw_device,
            device=device,
            progress=progress,
            inplace=inplace,
        )
    return SliceInferer(
        roi_size=tuple(roi_size) if roi_size is not None else (-1, -1),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=blend,
        sigma_scale=sigma_scale,
        spatial_dim=spatial_dim,
        sw_device=sw_device,
        device=device,
        progress=progress,
    )


class ImageInferer(Inferer):
    """One image ``(C, H, W)`` (or a batch ``(N, C, H, W)``) through a 2-D predictor, for the image tasks.

    A grey image given to a colour network is repeated to its channels and the result averaged back to
    one channel (the reference evaluation's handling of grey test sets).

    Args:
        channels: the channels the network takes.
        sw_device: device the network runs on; the result comes back to the input's device.
    """

    def __init__(self, channels: int = 3, sw_device: torch.device | str | None = None) -> None:
        self.channels = int(channels)
        self.sw_device = sw_device

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """
        Args:
            inputs: ``(C, H, W)`` or ``(N, C, H, W)`` in [0, 1].
            network: 2-D predictor, e.g. :class:`~ldct_clip.inference.SlicePredictor`.
        """
        single = inputs.ndim == 3
        batch = inputs[None] if single else inputs
        data = batch.as_tensor() if isinstance(batch, MetaTensor) else batch
        grey = data.shape[1] == 1 and self.channels == 3
        if data.shape[1] != self.channels and not grey:
            raise InputError(
                f"the network denoises {self.channels}-channel images, this image has {data.shape[1]} channels"
            )
        device = torch.device(self.sw_device) if self.sw_device is not None else data.device
        x = (data.repeat(1, 3, 1, 1) if grey else data).to(device, torch.float32)
        y = network(x, *args, **kwargs).to(data.device)
        y = y.mean(1, keepdim=True) if grey else y
        out = y[0] if single else y
        return (
            MetaTensor(out).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else out
        )
