"""Hounsfield-unit intensity transforms: model range and back (with FOV padding kept), display windows.

The network works on ``x = (HU + 1024) / 4096`` (the paper's CT normalisation). Scanners pad the corners
outside the reconstruction field of view with values like -2000 or -3024 HU; fed to the network those are
huge negative inputs at a sharp circular edge. :class:`HUToModelRange` maps them to air first and records
where they were (a bit-packed mask), so its inverse, alone or through MONAI's ``Invertd``, gives back HU
with the scanner's padding where it was.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, TransformBackends
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from ldct_clip.conventions import (
    AIR_HU,
    FOV_PADDING_THRESHOLD_HU,
    HU_RANGE,
    hu_to_model,
    model_to_hu,
    window_bounds,
)

__all__ = [
    "HUToModelRange",
    "HUToModelRanged",
    "ModelRangeToHU",
    "ModelRangeToHUd",
    "WindowHU",
    "WindowHUd",
]


class HUToModelRange(InvertibleTransform):
    """HU to the network's range, ``x = (HU - hu_min) / (hu_max - hu_min)`` (default ``(HU + 1024) / 4096``).

    Values below ``padding_threshold`` (outside the field of view) become ``air_hu`` before scaling. On a
    ``MetaTensor`` the transform records the range, the padding value and a bit-packed padding mask, so
    :meth:`inverse` (directly or through ``monai.transforms.Invertd``) restores HU and puts the padding back.

    Args:
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.
        padding_threshold: values strictly below are padding; ``None`` disables padding handling.
        air_hu: value padding is replaced with before scaling.
        clip: clip the output to [0, 1] (off by default: the paper's normalisation is unclipped).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        hu_min: float = HU_RANGE[0],
        hu_max: float = HU_RANGE[1],
        padding_threshold: float | None = FOV_PADDING_THRESHOLD_HU,
        air_hu: float = AIR_HU,
        clip: bool = False,
    ) -> None:
        if not hu_max > hu_min:
            raise ValueError(f"hu_max ({hu_max}) must exceed hu_min ({hu_min})")
        self.hu_min = float(hu_min)
        self.hu_max = float(hu_max)
        self.padding_threshold = padding_threshold
        self.air_hu = float(air_hu)
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Scale ``img`` (HU) to the model range, recording what :meth:`inverse` needs on a MetaTensor."""
        hu = convert_to_tensor(img, track_meta=get_track_meta(), dtype=torch.float32)
        padding_value = None
        packed = None
        if self.padding_threshold is not None:
            mask = hu < self.padding_threshold
            if bool(mask.any()):
                values = hu.as_tensor()[mask] if isinstance(hu, MetaTensor) else hu[mask]
                # One padding value per volume is what scanners write; keep the most frequent one.
                uniq, counts = torch.unique(values, return_counts=True)
                padding_value = float(uniq[counts.argmax()])
                packed = np.packbits(mask.detach().cpu().numpy().reshape(-1))
                hu = torch.where(mask, torch.as_tensor(self.air_hu, dtype=hu.dtype, device=hu.device), hu)
        out = hu_to_model(hu, (self.hu_min, self.hu_max))
        if self.clip:
            out = out.clamp(0.0, 1.0)
        if isinstance(img, np.ndarray):
            return out.detach().cpu().numpy()
        if isinstance(out, MetaTensor) and get_track_meta():
            extra = {
                "hu_min": self.hu_min,
                "hu_max": self.hu_max,
                "padding_value": padding_value,
                "padding_mask": packed,
                "shape": tuple(int(s) for s in out.shape),
            }
            self.push_transform(out, extra_info=extra)
        return out

    def inverse(self, data: NdarrayOrTensor) -> NdarrayOrTensor:
        """Model range back to HU with the recorded padding restored (the prediction must have the forward shape)."""
        transform = self.pop_transform(data)
        extra = transform[TraceKeys.EXTRA_INFO]
        hu_min, hu_max = float(extra["hu_min"]), float(extra["hu_max"])
        x = convert_to_tensor(data, track_meta=get_track_meta(), dtype=torch.float32)
        hu = model_to_hu(x, (hu_min, hu_max))
        packed = extra.get("padding_mask")
        if packed is not None and extra.get("padding_value") is not None:
            shape = tuple(int(s) for s in extra["shape"])
            if tuple(hu.shape) != shape:
                raise ValueError(
                    f"cannot restore FOV padding: data shape {tuple(hu.shape)} differs from the forward shape {shape}"
                )
            n = int(np.prod(shape))
            mask = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n).reshape(shape).astype(bool)
            hu = torch.where(
                torch.as_tensor(mask, device=hu.device),
                torch.as_tensor(float(extra["padding_value"]), dtype=hu.dtype, device=hu.device),
                hu,
            )
        return hu


class ModelRangeToHU(Transform):
    """Model range back to HU, ``HU = x * (hu_max - hu_min) + hu_min`` (no padding knowledge; see HUToModelRange).

    Args:
        hu_min: HU that 0 maps to.
        hu_max: HU that 1 maps to.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, hu_min: float = HU_RANGE[0], hu_max: float = HU_RANGE[1]) -> None:
        self.hu_min = float(hu_min)
        self.hu_max = float(hu_max)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=get_track_meta(), dtype=torch.float32)
        out = model_to_hu(x, (self.hu_min, self.hu_max))
        return convert_to_dst_type(out, img, dtype=torch.float32)[0] if isinstance(img, np.ndarray) else out


class WindowHU(Transform):
    """Display/metric window: ``(HU - lower) / (upper - lower)``, clipped to [0, 1] by default.

    Args:
        window: a window name of ``ldct_clip.conventions.WINDOWS`` or an explicit ``(lower, upper)`` in HU.
        clip: clip to [0, 1].
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, window: str | Sequence[float] = "abdomen", clip: bool = True) -> None:
        self.lower, self.upper = window_bounds(window)
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        hu = convert_to_tensor(img, track_meta=get_track_meta(), dtype=torch.float32)
        out = (hu - self.lower) / (self.upper - self.lower)
        if self.clip:
            out = out.clamp(0.0, 1.0)
        return convert_to_dst_type(out, img, dtype=torch.float32)[0] if isinstance(img, np.ndarray) else out


class HUToModelRanged(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`HUToModelRange`; invertible (``inverse`` / ``Invertd``).

    Args:
        keys: keys of the HU images.
        hu_min, hu_max, padding_threshold, air_hu, clip: see :class:`HUToModelRange`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = HUToModelRange.backend

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = HU_RANGE[0],
        hu_max: float = HU_RANGE[1],
        padding_threshold: float | None = FOV_PADDING_THRESHOLD_HU,
        air_hu: float = AIR_HU,
        clip: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = HUToModelRange(hu_min, hu_max, padding_threshold, air_hu, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter.inverse(d[key])
        return d


class ModelRangeToHUd(MapTransform):
    """Dictionary version of :class:`ModelRangeToHU`.

    Args:
        keys: keys of the model-range images.
        hu_min, hu_max: see :class:`ModelRangeToHU`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = ModelRangeToHU.backend

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = HU_RANGE[0],
        hu_max: float = HU_RANGE[1],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ModelRangeToHU(hu_min, hu_max)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class WindowHUd(MapTransform):
    """Dictionary version of :class:`WindowHU`.

    Args:
        keys: keys of the HU images.
        window, clip: see :class:`WindowHU`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = WindowHU.backend

    def __init__(
        self,
        keys: KeysCollection,
        window: str | Sequence[float] = "abdomen",
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = WindowHU(window, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
