"""The evaluation protocols: one registry for CT and RGB images.

Published denoising numbers are only comparable under the protocol they were computed with, so every
score of ldct-clip names one:

- ``"paper"`` (CT): the CLIPDenoising paper and its reference code ``basicsr/metrics/CT_psnr_ssim.py``:
  HU truncated to the model range (:data:`ldct_clip.conventions.HU_RANGE`), data range 4096, SSIM with an
  11x11 Gaussian window (sigma 1.5) and zero padding to "same" size, C1 = (0.01 R)^2, C2 = (0.03 R)^2,
  mean over the whole slice.
- ``"redcnn"`` (CT): the RED-CNN line of papers: HU truncated to the ``abdomen`` window, data range 400,
  the same SSIM.
- ``"ldctbench-<anatomy>"`` (CT): LDCTBench: HU windowed to the anatomy's window (``ldctbench_chest``,
  ``ldctbench_abdomen``, ``ldctbench_head``) and scaled to [0, 1]; PSNR with data range 1; SSIM with
  scikit-image's defaults (7x7 uniform window, sample covariance, mean without the 3-pixel border); RMSE
  on HU clipped to [-1024, 1900].
- ``"synthetic"`` and ``"srgb"`` (RGB): the reference's image test scripts (``Denoising/utils.py``, the
  conventions of BasicSR's ``calculate_psnr``/``calculate_ssim`` with ``crop_border=0``): clamp to [0, 1],
  x255 (rounded to uint8 for ``"srgb"``, where the clean image is an 8-bit file), PSNR over all pixels
  and channels with peak 255, MATLAB SSIM (11x11 Gaussian, valid region) averaged over channels.

The metric arithmetic lives in :mod:`ldct_clip.evaluation.metrics`; this module only says what each
protocol is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ldct_clip.conventions import HU_RANGE, window_bounds
from ldct_clip.errors import InputError

__all__ = [
    "ANATOMIES",
    "CT_METRICS",
    "PROTOCOLS",
    "RGB_METRICS",
    "CTProtocol",
    "Protocol",
    "RGBProtocol",
    "get_protocol",
]

#: Anatomies of the LDCTBench protocol (each has its display window in ``conventions.WINDOWS``).
ANATOMIES = ("chest", "abdomen", "head")
CT_METRICS = ("psnr", "ssim", "rmse")
RGB_METRICS = ("psnr", "ssim")


@dataclass(frozen=True)
class CTProtocol:
    """How a CT protocol turns HU slices into the arrays it scores.

    Args:
        name: protocol name, the key of :data:`PROTOCOLS`.
        window: name of the :data:`ldct_clip.conventions.WINDOWS` window the slices are truncated to
            before PSNR and SSIM.
        ssim_window: "gaussian11" (11x11 Gaussian, sigma 1.5, zero "same" padding, population variance,
            mean over the whole slice: the reference code) or "uniform7" (scikit-image's defaults).
        rmse_clip: HU interval the slices are clipped to before the RMSE.
        windowed: scale the truncated slices to [0, 1] (LDCTBench); the data range is then 1.
        dtype: working precision. "float32" for the reference's protocols: it computes in float32, and
            float64 differs from its numbers by ~2e-6 (more than the 1e-6 we promise to reproduce);
            "float64" for LDCTBench, whose scikit-image computes in float64.
        display_window: the ``WINDOWS`` window figures of this protocol are shown in (the protocol's own
            window, or the abdomen soft-tissue window where that is the whole HU range).
    """

    name: str
    window: str
    ssim_window: str
    rmse_clip: tuple[float, float]
    windowed: bool = False
    dtype: str = "float32"
    display_window: str = "abdomen"
    kind: ClassVar[str] = "ct"
    metric_names: ClassVar[tuple[str, ...]] = CT_METRICS

    @property
    def trunc(self) -> tuple[float, float]:
        """(lower, upper) HU the slices are truncated to before PSNR and SSIM."""
        return window_bounds(self.window)

    @property
    def data_range(self) -> float:
        """Data range R of PSNR and SSIM, in the units of the scored arrays."""
        low, high = self.trunc
        return 1.0 if self.windowed else high - low


@dataclass(frozen=True)
class RGBProtocol:
    """How an RGB protocol turns images in [0, 1] into the arrays it scores.

    Args:
        name: protocol name, the key of :data:`PROTOCOLS`.
        rounding: round the x255 images to integers (the 8-bit ground truth of real-noise data sets).
        peak: the peak value of PSNR and the data range of SSIM after scaling.
    """

    name: str
    rounding: bool
    peak: float = 255.0
    kind: ClassVar[str] = "rgb"
    metric_names: ClassVar[tuple[str, ...]] = RGB_METRICS


Protocol = CTProtocol | RGBProtocol


def _ldctbench(anatomy: str) -> CTProtocol:
    # LDCTBench computes the RMSE on HU clipped to [-1024, 1900]: its own interval, not a display window
    return CTProtocol(
        f"ldctbench-{anatomy}",
        f"ldctbench_{anatomy}",
        "uniform7",
        (HU_RANGE[0], 1900.0),
        windowed=True,
        dtype="float64",
        display_window=f"ldctbench_{anatomy}",
    )


#: Every protocol by name.
PROTOCOLS: dict[str, Protocol] = {
    "paper": CTProtocol("paper", "full", "gaussian11", window_bounds("full")),
    "redcnn": CTProtocol("redcnn", "abdomen", "gaussian11", window_bounds("abdomen")),
    **{f"ldctbench-{anatomy}": _ldctbench(anatomy) for anatomy in ANATOMIES},
    "synthetic": RGBProtocol("synthetic", rounding=False),
    "srgb": RGBProtocol("srgb", rounding=True),
}


def get_protocol(protocol: str | Protocol, anatomy: str = "abdomen") -> Protocol:
    """The protocol called ``protocol``; ``"ldctbench"`` with ``anatomy`` picks ``"ldctbench-<anatomy>"``.

    Raises:
        InputError: an unknown protocol or anatomy.
    """
    if isinstance(protocol, CTProtocol | RGBProtocol):
        return protocol
    if protocol == "ldctbench":
        if anatomy not in ANATOMIES:
            raise InputError(
                f"unknown anatomy {anatomy!r} for the ldctbench protocol: use one of {', '.join(ANATOMIES)}"
            )
        protocol = f"ldctbench-{anatomy}"
    if protocol not in PROTOCOLS:
        raise InputError(
            f"unknown metric protocol {protocol!r}: use one of paper, redcnn, ldctbench (with an anatomy), "
            "synthetic, srgb"
        )
    return PROTOCOLS[protocol]
