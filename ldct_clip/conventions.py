"""CT conventions: the one home of the numbers every part of ldct-clip must agree on.

- **Model range.** The network works on ``x = (HU + 1024) / 4096`` (the paper's normalisation): HU in
  [-1024, 3072] map to [0, 1], unclipped. :func:`hu_to_model` and :func:`model_to_hu` are the only
  implementations of that map; transforms, metrics, baselines, caches and the simulation call them.
- **Field-of-view padding.** Scanners fill the corners outside the reconstruction circle with a value no
  tissue has (-2000, -2048, -3024, -3072 or -32768 HU). Anything below :data:`FOV_PADDING_THRESHOLD_HU`
  is padding: air is -1000 HU and quarter-dose noise barely takes it below -1100 HU (the lowest voxel of
  our simulated quarter dose of the 20-slice TotalSegmentator example series is -1116 HU), while the
  highest padding value in use is -2000. -1500 leaves about 400 HU of margin on the noise side and 500 HU
  on the padding side. Padding is shown to the network as :data:`AIR_HU` and given
  back unchanged.
- **Body.** Pixels above :data:`BODY_THRESHOLD_HU` (-500 HU, halfway between air and fat) are inside the
  patient: noise ROIs, crops and bounding boxes are placed there.
- **Orientation.** The network sees axial slices in DICOM's display orientation, :data:`ORIENTATION`
  ``"LPS"`` (columns towards the patient's left, rows towards posterior): that of the training slices.
- **Display windows.** Named (lower, upper) HU windows, :data:`WINDOWS`; figures and protocols use them by
  name.
- **Simulated low dose.** The defaults of the projection-domain simulation (``ldct_clip.simulation``), shared
  by ``ldct-clip simulate``, the training noise, the demo and the data preparation: the full-dose photon
  count calibrated to the Mayo-2016-like quarter-dose noise (see ``ldct_clip.simulation.physics``), the
  electronic noise, the number of views, and the filters the noise may be reconstructed with.

Pure numbers and arithmetic only (no torch import): works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "AIR_HU",
    "BODY_THRESHOLD_HU",
    "DEFAULT_ELECTRONIC_NOISE",
    "DEFAULT_N_VIEWS",
    "DEFAULT_PHOTONS",
    "FBP_FILTERS",
    "FOV_PADDING_THRESHOLD_HU",
    "HU_RANGE",
    "ORIENTATION",
    "WINDOWS",
    "hu_to_model",
    "is_fov_padding",
    "model_to_hu",
    "window_bounds",
]

#: HU interval mapped to the model range [0, 1]: x = (HU - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]).
HU_RANGE: tuple[float, float] = (-1024.0, 3072.0)
#: What the network is shown in place of field-of-view padding: the bottom of the model range (x = 0).
AIR_HU: float = HU_RANGE[0]
#: Values strictly below this are field-of-view padding, not tissue or noisy air (see the module text).
FOV_PADDING_THRESHOLD_HU: float = -1500.0
#: Values above this are inside the body (halfway between air, -1000, and fat, about -100).
BODY_THRESHOLD_HU: float = -500.0
#: Orientation of the slices the network sees (and was trained on): DICOM's display orientation.
ORIENTATION: str = "LPS"

#: Named display windows, (lower, upper) HU. ``abdomen`` is the RED-CNN protocol's soft-tissue window;
#: the ``ldctbench_*`` ones are LDCTBench's centre/width windows; ``full`` is the model range.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),
    "ldctbench_chest": (-600.0 - 1500.0 / 2, -600.0 + 1500.0 / 2),
    "ldctbench_abdomen": (50.0 - 400.0 / 2, 50.0 + 400.0 / 2),
    "ldctbench_head": (40.0 - 80.0 / 2, 40.0 + 80.0 / 2),
    "chest": (-600.0 - 1500.0 / 2, -600.0 + 1500.0 / 2),
    "head": (40.0 - 80.0 / 2, 40.0 + 80.0 / 2),
    "full": HU_RANGE,
}

#: Full-dose photons per view (1 mm bin, 3 mm slice, 1000 views) of the simulation: quarter dose then adds
#: about 20 HU of noise in a 300 mm water cylinder.
DEFAULT_PHOTONS: float = 6.9e6
#: Electronic noise of the simulated detector, standard deviation in counts.
DEFAULT_ELECTRONIC_NOISE: float = 10.0
#: Projection angles over 180 degrees of the simulation.
DEFAULT_N_VIEWS: int = 720
#: Filters the simulated noise may be reconstructed with (scikit-image's FBP filters).
FBP_FILTERS: tuple[str, ...] = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

T = TypeVar("T")


def hu_to_model(hu: T, hu_range: Sequence[float] = HU_RANGE) -> T:
    """HU to the model range, ``(HU - low) / (high - low)``; unclipped. Works on arrays and tensors.

    Args:
        hu: values in Hounsfield units.
        hu_range: the HU interval mapped to [0, 1] (default :data:`HU_RANGE`).
    """
    low, high = float(hu_range[0]), float(hu_range[1])
    return (hu - low) / (high - low)


def model_to_hu(x: T, hu_range: Sequence[float] = HU_RANGE) -> T:
    """The model range back to HU, ``x * (high - low) + low``; the inverse of :func:`hu_to_model`.

    Args:
        x: values in the model range.
        hu_range: the HU interval [0, 1] stands for; ``(-1024, 3096)`` reproduces the reference test
            script's denormalisation slip.
    """
    low, high = float(hu_range[0]), float(hu_range[1])
    return x * (high - low) + low


def is_fov_padding(hu: T, threshold: float = FOV_PADDING_THRESHOLD_HU) -> T:
    """Boolean mask of the field-of-view padding (values below ``threshold``)."""
    return hu < threshold


def window_bounds(window: str | Sequence[float]) -> tuple[float, float]:
    """(lower, upper) HU of a named window (:data:`WINDOWS`) or of an explicit ``(lower, upper)`` pair.

    Raises:
        ValueError: an unknown name, or an upper bound not above the lower one.
    """
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; choose one of {', '.join(sorted(WINDOWS))}")
        return WINDOWS[window]
    lower, upper = (float(v) for v in window)
    if not upper > lower:
        raise ValueError(f"window upper bound {upper} must exceed the lower bound {lower}")
    return lower, upper
