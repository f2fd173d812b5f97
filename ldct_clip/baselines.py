"""Classical denoisers for CT slices, the baselines of ``ldct-clip benchmark``.

Each baseline sees one low-dose slice in HU and nothing else: its noise level is estimated from that
slice, and its parameters follow from the estimate by rules fixed here, before any test data is seen. No
parameter is tuned on the pairs being benchmarked.

Working space. The slice is mapped to the model's range (``ldct_clip.conventions.hu_to_model``, the map
the network sees), denoised there and mapped back. The map is linear and every rule below is
scale-equivariant (h and the TV weight are multiples of the estimated sigma), so results do not depend on a
display window. Field-of-view padding (``conventions.is_fov_padding``) is set to ``conventions.AIR_HU``
first so that its edge is not treated as signal, and restored afterwards.

Noise level. CT noise after filtered back-projection is spatially correlated. scikit-image's wavelet
``estimate_sigma`` sees only its finest scale: on four 512x512 slices of a real abdominal CT (shared
TotalSegmentator example) with simulated quarter dose (19.5 HU added to ~10 HU of normal-dose noise, so
~22 HU in all) it read 12.2 HU, and NLM gained 1.1 dB PSNR (redcnn protocol) where it gains 2.3 dB with the
default ``"flat"`` estimator, which read 23.7 HU: the pixel standard deviation in the flattest windows of
the slice itself (see ``estimate_noise_sigma``). ``"wavelet"`` remains available and is right for white
noise. Either way the estimate comes from the low-dose slice alone, and the benchmark's CSV records it.

Rules (fixed a priori):

- ``nlm``: ``skimage.restoration.denoise_nl_means`` with scikit-image's default patch size 7 and search
  distance 11, ``fast_mode=True``, ``sigma`` = the estimate and ``h = 0.8 * sigma``, the value
  scikit-image documents as the starting point for the fast mode when ``sigma`` is given.
- ``tv``: ``skimage.restoration.denoise_tv_chambolle`` with ``weight = 0.75 * sigma``. The ROF weight has
  the units of the image, so it scales with the noise; the factor is the PSNR optimum on scikit-image's
  Shepp-Logan phantom (256 px) with white noise of 1, 3 and 10 % of the range (grid 0.25-4), while
  Chambolle's discrepancy principle (residual std = sigma) lands at ~3 sigma and visibly over-smooths.
- ``bm3d``: the ``bm3d`` package (Mäkinen, Azzari, Foi), ``bm3d.bm3d(x, sigma_psd=sigma)`` with its default
  profile. Used only when the user installed it: its licence allows non-commercial use only, so it is
  never a dependency of ldct-clip.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter, uniform_filter
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, estimate_sigma

from ldct_clip.conventions import (
    AIR_HU,
    BODY_THRESHOLD_HU,
    HU_RANGE,
    hu_to_model,
    is_fov_padding,
    model_to_hu,
)
from ldct_clip.errors import InputError

__all__ = [
    "NOISE_ESTIMATORS",
    "BASELINES",
    "BM3DDenoiser",
    "BaselineDenoiser",
    "NLMDenoiser",
    "TVDenoiser",
    "estimate_noise_sigma",
    "get_baseline",
]

# HU per unit of the model range: converts noise levels (differences, not positions) back to HU.
HU_PER_MODEL_UNIT = HU_RANGE[1] - HU_RANGE[0]
NOISE_ESTIMATORS = ("flat", "wavelet")
# The "flat" estimator (see estimate_noise_sigma): 8 x 8 windows fit between the edges of small images and
# of organs; windows are ranked by the structure left after smoothing the slice with a Gaussian of 2 px (the
# noise averages out, edges stay), and the noise variance is the median of the raw window variances over
# the flattest quarter. Ranking on the raw variance instead (its low percentiles) picks windows where the
# noise happens to be low and reads 10-20 % low on correlated noise.
FLAT_WINDOW = 8
FLAT_FRACTION = 0.25
STRUCTURE_SMOOTHING_PX = 2.0

BM3D_INSTALL_HINT = (
    "install it yourself with `pip install bm3d` (its licence allows non-commercial use only, "
    "so ldct-clip does not depend on it)"
)


def to_working_space(slice_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map a HU slice to the model range with padding set to air; returns ``(x, padding_mask)``."""
    hu = np.asarray(slice_hu, dtype=np.float64)
    if hu.ndim != 2:
        raise InputError(f"a baseline denoises one 2-D slice at a time, got an array of shape {hu.shape}")
    if not np.all(np.isfinite(hu)):
        raise InputError("the slice contains NaN or infinite values; fix the input volume")
    padding = is_fov_padding(hu)
    hu = np.where(padding, AIR_HU, hu)
    return hu_to_model(hu), padding


def from_working_space(x: np.ndarray, padding: np.ndarray, slice_hu: np.ndarray) -> np.ndarray:
    """Map back to HU and put the original padding values back; float32 like the loaded volumes."""
    hu = model_to_hu(x)
    hu = np.where(padding, np.asarray(slice_hu, dtype=np.float64), hu)
    return hu.astype(np.float32)


def estimate_noise_sigma(
    x: np.ndarray, estimator: str = "flat", body_threshold: float | None = None, window: int = FLAT_WINDOW
) -> float:
    """Noise standard deviation of a 2-D image, estimated from the image alone.

    Args:
        x: the image, any linear intensity scale; the estimate is in the same units.
        estimator: ``"flat"``: homogeneous-block estimation. Every ``window`` x ``window`` window inside the
            body is ranked by the variance of a Gaussian-smoothed copy of the image (the structure); over
            the flattest quarter, the median of the windows' raw variance is the noise variance. It
            measures the pixel standard deviation of spatially correlated noise too. ``"wavelet"``: scikit-image's ``estimate_sigma`` (median absolute deviation
            of the finest diagonal wavelet coefficients, Donoho & Johnstone), exact for white noise but blind
            to the low frequencies of CT noise.
        body_threshold: intensity above which a pixel belongs to the body (same units as ``x``); windows
            (``"flat"``) or the bounding box (``"wavelet"``) are restricted to the body, because the air
            around the patient is often clipped at -1024 HU and would pull the estimate down. None: whole
            image.
        window: side of the windows of the ``"flat"`` estimator, pixels.
    """
    x = np.asarray(x, dtype=np.float64)
    body = np.ones(x.shape, dtype=bool) if body_threshold is None else x > body_threshold
    if estimator == "flat" and min(x.shape) >= window:
        n = float(window * window)

        def local_variance(image: np.ndarray) -> np.ndarray:
            mean = uniform_filter(image, window, mode="reflect")
            return (
                np.maximum(uniform_filter(image * image, window, mode="reflect") - mean * mean, 0.0)
                * n
                / (n - 1)
            )

        # Window centres away from the border (reflected pixels would fake flatness) and fully in the body.
        inside = uniform_filter(body.astype(np.float64), window, mode="constant") > 1.0 - 0.5 / n
        half = window // 2
        valid = np.zeros_like(inside)
        valid[half : x.shape[0] - (window - 1 - half), half : x.shape[1] - (window - 1 - half)] = True
        if (valid & inside).any():
            valid &= inside
        structure = local_variance(gaussian_filter(x, STRUCTURE_SMOOTHING_PX))[valid]
        noise = local_variance(x)[valid]
        flattest = noise[structure <= np.quantile(structure, FLAT_FRACTION)]
        return float(np.sqrt(np.median(flattest)))
    if estimator not in NOISE_ESTIMATORS:
        raise InputError(f"unknown noise estimator {estimator!r}; choose from {', '.join(NOISE_ESTIMATORS)}")
    rows = np.flatnonzero(np.any(body, axis=1))
    cols = np.flatnonzero(np.any(body, axis=0))
    # A bounding box smaller than a few wavelet supports gives no stable estimate: use the whole image.
    if rows.size and cols.size and rows[-1] - rows[0] >= 15 and cols[-1] - cols[0] >= 15:
        x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return float(estimate_sigma(x, channel_axis=None))


@dataclass
class BaselineDenoiser(ABC):
    """A classical slice denoiser whose parameters are a fixed function of the slice's estimated noise.

    Calling it on a HU slice returns the denoised HU slice (float32); ``last_parameters`` then holds the
    values used for that slice (``sigma_hu`` and the method's own), for the benchmark's CSV.

    Args:
        noise_estimator: ``"flat"`` or ``"wavelet"``, see :func:`estimate_noise_sigma`.
    """

    name: str = "baseline"
    noise_estimator: str = "flat"
    last_parameters: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    @abstractmethod
    def describe(self) -> str:
        """One line for the report: the method and the rule that sets its parameters."""

    @abstractmethod
    def denoise(self, x: np.ndarray, sigma: float) -> tuple[np.ndarray, dict[str, float]]:
        """Denoise ``x`` (working space) given its estimated noise ``sigma``; returns the image and the
        parameters used, in HU."""

    def __post_init__(self) -> None:
        if self.noise_estimator not in NOISE_ESTIMATORS:
            raise InputError(
                f"unknown noise estimator {self.noise_estimator!r}; choose from {', '.join(NOISE_ESTIMATORS)}"
            )

    def _sigma_rule(self) -> str:
        if self.noise_estimator == "flat":
            return (
                f"median std of the {FLAT_WINDOW}x{FLAT_WINDOW} windows of the low-dose slice's body whose "
                f"structure (variance after a {STRUCTURE_SMOOTHING_PX:g} px Gaussian) is in the flattest "
                f"{FLAT_FRACTION:.0%}"
            )
        return "scikit-image `estimate_sigma` (wavelet) of the low-dose slice"

    def __call__(self, slice_hu: np.ndarray) -> np.ndarray:
        x, padding = to_working_space(slice_hu)
        body_threshold = hu_to_model(BODY_THRESHOLD_HU)
        sigma = estimate_noise_sigma(x, self.noise_estimator, body_threshold=body_threshold)
        out, parameters = self.denoise(x, sigma)
        self.last_parameters = {"sigma_hu": sigma * HU_PER_MODEL_UNIT, **parameters}
        return from_working_space(out, padding, slice_hu)


@dataclass
class NLMDenoiser(BaselineDenoiser):
    """Non-local means (scikit-image, fast mode) with ``h = h_factor * sigma``.

    Args:
        patch_size: side of the compared patches, pixels (scikit-image's default 7).
        patch_distance: search radius, pixels (scikit-image's default 11).
        h_factor: ``h`` as a multiple of the estimated sigma (0.8, scikit-image's documented starting
            point for ``fast_mode=True`` with ``sigma`` given).
    """

    name: str = "nlm"
    patch_size: int = 7
    patch_distance: int = 11
    h_factor: float = 0.8

    def describe(self) -> str:
        return (
            f"non-local means (scikit-image `denoise_nl_means`, fast mode), patch {self.patch_size}, "
            f"search distance {self.patch_distance}, sigma = {self._sigma_rule()}, "
            f"h = {self.h_factor:g} sigma"
        )

    def denoise(self, x: np.ndarray, sigma: float) -> tuple[np.ndarray, dict[str, float]]:
        h = self.h_factor * sigma
        out = denoise_nl_means(
            x,
            patch_size=self.patch_size,
            patch_distance=self.patch_distance,
            h=h,
            sigma=sigma,
            fast_mode=True,
            preserve_range=True,
            channel_axis=None,
        )
        return out, {"h_hu": h * HU_PER_MODEL_UNIT}


@dataclass
class TVDenoiser(BaselineDenoiser):
    """Total-variation denoising (Chambolle's ROF solver, scikit-image) with ``weight = weight_factor * sigma``.

    Args:
        weight_factor: the ROF weight as a multiple of the estimated sigma (0.75, see the module docstring).
    """

    name: str = "tv"
    weight_factor: float = 0.75

    def describe(self) -> str:
        return (
            f"total variation (scikit-image `denoise_tv_chambolle`), sigma = {self._sigma_rule()}, "
            f"weight = {self.weight_factor:g} sigma"
        )

    def denoise(self, x: np.ndarray, sigma: float) -> tuple[np.ndarray, dict[str, float]]:
        weight = self.weight_factor * sigma
        out = denoise_tv_chambolle(x, weight=weight, channel_axis=None)
        return out, {"weight_hu": weight * HU_PER_MODEL_UNIT}


@dataclass
class BM3DDenoiser(BaselineDenoiser):
    """BM3D from the user-installed ``bm3d`` package, with ``sigma_psd`` = the estimated sigma."""

    name: str = "bm3d"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self._bm3d = importlib.import_module("bm3d")
        except ImportError as error:
            raise InputError(
                f"method 'bm3d' needs the bm3d package, which is not installed: {BM3D_INSTALL_HINT}"
            ) from error

    def describe(self) -> str:
        return f"BM3D (`bm3d` package, default profile), sigma_psd = {self._sigma_rule()}"

    def denoise(self, x: np.ndarray, sigma: float) -> tuple[np.ndarray, dict[str, float]]:
        out = self._bm3d.bm3d(x, sigma_psd=sigma)
        return np.asarray(out, dtype=np.float64).reshape(x.shape), {}


BASELINES: dict[str, type[BaselineDenoiser]] = {"nlm": NLMDenoiser, "tv": TVDenoiser, "bm3d": BM3DDenoiser}


def get_baseline(name: str, noise_estimator: str = "flat") -> BaselineDenoiser:
    """The baseline called ``name`` ("nlm", "tv" or "bm3d") with its fixed rules.

    Args:
        name: the method.
        noise_estimator: ``"flat"`` or ``"wavelet"``, see :func:`estimate_noise_sigma`.

    Raises:
        InputError: unknown name, or "bm3d" without the ``bm3d`` package.
    """
    try:
        cls = BASELINES[name]
    except KeyError:
        raise InputError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
    return cls(noise_estimator=noise_estimator)
