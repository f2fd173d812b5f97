"""Denoising whole CT volumes with the 2-D network, slice by slice, through MONAI inferers.

The network sees one axial slice at a time (the paper's setting). Two inferers do the slicing:

- :class:`SliceBatchInferer` (default) streams batches of whole slices from the host-memory volume to the
  compute device and writes each result straight into one preallocated output. Nothing else the size of
  the volume is allocated, so a 512x512x600 volume needs the volume, its output and a bounded working set.
- MONAI's :class:`~monai.inferers.SliceInferer` when a smaller ``roi_size`` or an ``overlap`` with
  ``"constant"``/``"gaussian"`` blending is asked for (it keeps a full-size output plus a full-size
  weight map, the price of blending overlapping windows).

Both call a :class:`SlicePredictor` on each batch of slices: reflect-pad to a multiple of 32 (as the
reference evaluation does before the network), optional mixed precision, crop back, float32 out.
:func:`denoise_volume` is the one entry point the CLI, the bundle, the demo and evaluation share.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nibabel as nib
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.inferers import Inferer, SliceInferer
from monai.transforms import Orientation
from monai.utils import BlendMode
from torch import nn
from tqdm.auto import tqdm

from ldct_clip.errors import InputError, WeightsError
from ldct_clip.networks import load_checkpoint, load_model, load_model_weights, pad_to_multiple

__all__ = [
    "CPU_AMP_DEFAULT",
    "DEFAULT_BATCH_SIZE",
    "HUBatchConversion",
    "PAD_MULTIPLE",
    "SliceBatchInferer",
    "SlicePredictor",
    "ORIENTATION",
    "default_channels_last",
    "denoise_volume",
    "limit_heap_fragmentation",
    "load_denoiser",
    "make_inferer",
    "resolve_amp",
    "resolve_device",
]

logger = logging.getLogger(__name__)

#: The reference evaluation reflect-pads every test image to a multiple of 32 before the network.
PAD_MULTIPLE = 32
#: Slices per forward pass. CPU: 2 keeps 512x512x300 within "volume + 1.5 GB" of memory; 4 is ~25% faster
#: per slice with bf16 but needs ~0.5 GB more (benchmarks/README.md). GPU: not measured, a safe guess.
DEFAULT_BATCH_SIZE = {"cpu": 2, "cuda": 16}
#: Mixed precision on CPUs with bf16 in hardware (AVX512-BF16/AMX) when ``amp`` is left to its default:
#: float32. With random weights bf16 looked free (outputs within 71 dB of float32), but with trained CT
#: weights it cost 0.074 dB PSNR on held-out simulated quarter dose (0.12 dB on the phantom pair; see
#: benchmarks/README.md), over the 0.05 dB allowed, so bf16 on CPU is opt-in (``amp="bf16"``, ``--amp``).
CPU_AMP_DEFAULT: torch.dtype | None = None

#: Orientation the network sees slices in: DICOM's display orientation (x towards the patient's left, y
#: towards posterior), that of the training slices; an axial DICOM series is already stored like this.
ORIENTATION = "LPS"

_AMP_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The compute device: ``"auto"`` (or None) is the first GPU where there is one, else the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu or auto")
    return resolved


def _cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_native_bf16() -> bool:
    """bf16 in hardware (AVX512-BF16 or AMX): elsewhere oneDNN emulates it, usually slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_amp(amp: bool | str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain float32.

    Args:
        amp: None for the measured default (bf16 or fp16 on a GPU, :data:`CPU_AMP_DEFAULT` on the CPU);
            False / ``"fp32"`` / ``"none"`` for float32; True for the device's best half type (bf16 where
            supported, else fp16 on a GPU, float32 on a CPU without bf16); ``"bf16"`` or ``"fp16"``
            (or the torch dtype) to force one.
        device: the compute device.
    """
    if isinstance(amp, str):
        key = amp.lower()
        if key in ("fp32", "float32", "none", "off", "false"):
            return None
        if key in ("auto",):
            amp = None
        elif key in ("on", "true"):
            amp = True
        elif key in _AMP_NAMES:
            amp = _AMP_NAMES[key]
        else:
            raise InputError(f"unknown mixed precision {amp!r}: use auto, bf16, fp16 or fp32")
    if isinstance(amp, torch.dtype):
        return None if amp == torch.float32 else amp
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is None:
        return CPU_AMP_DEFAULT if _cpu_has_native_bf16() else None
    if not _cpu_supports_bf16():
        logger.warning("this CPU has no bf16 support: running in float32")
        return None
    return torch.bfloat16


class SlicePredictor(nn.Module):
    """What the inferers call on a batch of 2-D slices ``(B, C, H, W)``.

    Reflect-pads the bottom/right edges to a multiple of ``multiple`` (the reference evaluation's
    ``pad_test``), runs the network under autocast when ``amp_dtype`` is set, crops back and returns
    float32. Optional ``preprocess``/``postprocess`` run on the batch before/after the network (the
    streaming path converts HU to the model range and back per batch, so no normalised copy of the
    whole volume is ever made).

    Args:
        network: the 2-D network, ``(B, C, H, W) -> (B, C_out, H, W)``.
        multiple: pad height and width up to a multiple of this (1: no padding).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for float32.
        preprocess: callable applied to the batch before padding, e.g. HU to the model range.
        postprocess: callable ``postprocess(prediction, batch)`` applied after cropping, e.g. back to HU
            with the input's padding restored.
        channels_last: run the network in NHWC memory format (converts ``network`` in place when it is a
            module, and feeds it NHWC batches): much faster oneDNN convolutions on CPUs (benchmarks/README.md).
            Results differ from NCHW by float rounding only.
        flip_dims: batch dims (-2, -1) to flip before the network and back after it: shows the network
            the slices in another in-plane orientation without reorienting (copying) the whole volume.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        multiple: int = PAD_MULTIPLE,
        amp_dtype: torch.dtype | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
        flip_dims: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.flip_dims = tuple(flip_dims)
        self.channels_last = channels_last
        if channels_last and isinstance(network, nn.Module):
            network.to(memory_format=torch.channels_last)
        self.network = network
        self.multiple = int(multiple)
        self.amp_dtype = amp_dtype
        self.preprocess = preprocess
        self.postprocess = postprocess

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(batch) if self.preprocess is not None else batch
        x = x.float()
        if self.flip_dims:
            x = x.flip(self.flip_dims)
        height, width = x.shape[-2:]
        if self.multiple > 1:
            x = pad_to_multiple(x, self.multiple)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                y = self.network(x)
        else:
            y = self.network(x)
        y = y[..., :height, :width].float()
        y = y.flip(self.flip_dims) if self.flip_dims else y.contiguous()
        if self.postprocess is not None:
            y = self.postprocess(y, batch)
        return y


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
                        # allocated outside any inference_mode the caller may use later (Invertd edits in place)
                        with torch.inference_mode(False):
                            output = torch.empty(shape, dtype=pred.dtype, device=device)
                    output[item].narrow(axis - 1, start, count).copy_(pred.movedim(0, axis - 1))
                    bar.update(count)
        if output is None:  # zero slices
            output = torch.empty(inputs.shape, dtype=inputs.dtype, device=device)
        if isinstance(inputs, MetaTensor):
            output = MetaTensor(output).copy_meta_from(inputs, copy_attr=False)
        return output


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
    """The inferer for slice-wise denoising: streaming whole slices, or MONAI's SliceInferer for windows.

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


class HUBatchConversion:
    """HU to the model range and back for one batch of slices, on the fly.

    The same :class:`~ldct_clip.transforms.HUToModelRange` / :class:`~ldct_clip.transforms.ModelRangeToHU`
    the bundle applies to the whole volume, applied per batch so that no normalised copy of the volume
    is ever made. Voxels below the padding threshold (outside the field of view) get their input value
    back, as ``HUToModelRange.inverse`` does.

    Args:
        to_model: the HU -> model range transform (default settings: ``x = (HU + 1024) / 4096``).
        to_hu: its inverse scaling (must use the same range).
    """

    def __init__(self, to_model: Any = None, to_hu: Any = None) -> None:
        from ldct_clip.transforms import HUToModelRange, ModelRangeToHU

        self.forward = to_model if to_model is not None else HUToModelRange()
        self.backward = (
            to_hu if to_hu is not None else ModelRangeToHU(self.forward.hu_min, self.forward.hu_max)
        )

    def to_model(self, hu: torch.Tensor) -> torch.Tensor:
        with _no_meta_tracking():
            return self.forward(hu)

    def to_hu(self, x: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        with _no_meta_tracking():
            out = self.backward(x)
        threshold = self.forward.padding_threshold
        if threshold is not None:
            out = torch.where(hu < threshold, hu.to(out.dtype), out)
        return out


class _no_meta_tracking:
    """MONAI transforms turn plain tensors into MetaTensors while meta tracking is on; batches of slices
    need no meta (and MetaTensor dispatch slows every network op), so tracking is off around them."""

    def __enter__(self) -> None:
        self.previous = get_track_meta()
        set_track_meta(False)

    def __exit__(self, *exc: Any) -> None:
        set_track_meta(self.previous)


def default_channels_last(device: torch.device) -> bool:
    """NHWC on CPUs, where oneDNN convolutions run much faster so (benchmarks/README.md); NCHW on GPUs,
    where it has not been measured for this network."""
    return device.type == "cpu"


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, for the rest of the process.

    A volume denoised slice batch after slice batch allocates and frees the same mid-sized activations
    again and again; glibc's heap keeps the freed pages and fragments, which cost ~160 MB of peak RSS at
    512x512 (benchmarks/README.md). With mmap they go back to the system when freed. Process-wide, so
    for programs (``ldct-clip denoise``), not called by the library itself. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH_SIZE.get(device.type, 1)


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
    inplace: bool = False,
    progress: bool = True,
) -> MetaTensor:
    """Denoise a CT volume in Hounsfield units, slice by slice; HU in, HU out.

    The volume stays where it is (host memory); batches of slices go to ``device`` and come back. Each
    batch is converted to the model range and back on the fly (:class:`HUToModelRange`,
    :class:`ModelRangeToHU`), so apart from the input the only volume-sized allocation is the output.
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
        channels_last: run the network in NHWC memory format (converts ``model`` in place); None: the
            measured default for the device (:func:`default_channels_last`).
        inplace: overwrite ``volume_hu`` with the result (whole slices only) so that the volume is held in
            memory once; for callers that no longer need the noisy volume, like ``ldct-clip denoise``.
        progress: tqdm bar over slices.

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
    amp_dtype = resolve_amp(amp, compute_device)
    model = model.to(compute_device).eval()

    oriented, undo, flip_dims = _orient(volume, axcodes)
    hu = HUBatchConversion()
    predictor = SlicePredictor(
        model,
        multiple=PAD_MULTIPLE,
        amp_dtype=amp_dtype,
        preprocess=hu.to_model,
        postprocess=hu.to_hu,
        channels_last=default_channels_last(compute_device) if channels_last is None else channels_last,
        flip_dims=flip_dims,
    )
    inferer = make_inferer(
        sw_batch_size=batch_size or _default_batch_size(compute_device),
        roi_size=roi_size,
        overlap=overlap,
        blend=blend,
        sw_device=compute_device,
        device=volume.device,
        progress=progress,
        inplace=inplace,
    )
    with torch.no_grad():
        denoised = inferer(oriented[None], predictor)[0]
    out = MetaTensor(undo(denoised)).copy_meta_from(volume)
    return out[0] if squeeze else out


def _orient(
    volume: MetaTensor, axcodes: str | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]:
    """``volume`` ready to be sliced along its last axis so that the network sees ``axcodes`` slices.

    Returns the volume (reoriented only if its axes must be permuted), the function that turns a result
    back, and the in-plane flips for :class:`SlicePredictor`. Nothing is copied when the axes only need
    flipping (every axial DICOM series and NIfTI volume): the slices are flipped batch by batch, and
    the order of the slices does not matter to a 2-D network.
    """
    current = "".join(nib.aff2axcodes(volume.affine.cpu().numpy()))
    if axcodes is None or current == axcodes:
        return volume.as_tensor(), lambda out: out, ()
    opposite = dict(zip("LRPAIS", "RLAPSI"))
    if all(c in (t, opposite[t]) for c, t in zip(current, axcodes)):
        flips = tuple(dim for dim, c, t in zip((-2, -1), current[:2], axcodes[:2]) if c != t)
        return volume.as_tensor(), lambda out: out, flips
    oriented = Orientation(axcodes=axcodes, labels=None)(volume)
    back = Orientation(axcodes=current, labels=None)

    def undo(out: torch.Tensor) -> torch.Tensor:
        result = MetaTensor(out, affine=oriented.affine)
        return back(result).as_tensor()

    return oriented.as_tensor(), undo, ()
