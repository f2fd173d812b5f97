"""PSNR and SSIM of RGB (or grey) images under the reference code's evaluation protocol.

The reference (``alwaysuu/CLIPDenoising``, ``Denoising/test_synthetic_denoising.py``,
``Denoising/test_real_denoising_sRGB.py`` with ``Denoising/utils.py``; the same conventions as BasicSR's
``calculate_psnr``/``calculate_ssim`` with ``crop_border=0``):

- the network input is reflect-padded at the bottom and right to a multiple of 32 and the output cropped
  back (:func:`pad_to_multiple`, :func:`crop_to`);
- the output is clamped to [0, 1] and multiplied by 255: no rounding for the synthetic-noise protocol,
  rounded to uint8 for the sRGB (real noise) protocol, where the clean image is the 8-bit file;
- PSNR: one mean squared error over all pixels and channels, peak 255, float64;
- SSIM: the MATLAB definition of Wang et al. (11x11 Gaussian window, sigma 1.5, C1 = (0.01*255)^2,
  C2 = (0.03*255)^2, population variances), the mean over the *valid* region (the window wholly inside the
  image: 5 pixels cropped on each side), computed per channel and averaged over channels.

Own code, not MONAI's ``SSIMMetric``/``PSNRMetric``: MONAI computes SSIM in float32, which moves the values
by about 5e-6 from the float64 MATLAB/BasicSR numbers this protocol is compared against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d

from ldct_clip.errors import InputError

__all__ = [
    "PROTOCOLS",
    "crop_to",
    "pad_to_multiple",
    "psnr_255",
    "rgb_metrics",
    "ssim_matlab",
    "to_255",
]

PROTOCOLS = ("synthetic", "srgb")


def pad_to_multiple(
    image: torch.Tensor, multiple: int = 32, mode: str = "reflect"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dimensions at the bottom and right up to a multiple (the reference's evaluation).

    Args:
        image: (..., H, W) tensor, e.g. (B, C, H, W).
        multiple: target multiple (32 in the reference scripts).
        mode: ``torch.nn.functional.pad`` mode; "reflect" as the reference (needs H, W > the padding).

    Returns:
        the padded tensor and the original (H, W) for :func:`crop_to`.
    """
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return image, (h, w)
    if mode == "reflect" and (pad_h >= h or pad_w >= w):
        mode = "replicate"  # reflection needs more rows than the padding; tiny images only
    batched = image if image.dim() >= 4 else image.unsqueeze(0)
    padded = F.pad(batched, (0, pad_w, 0, pad_h), mode=mode)
    return (padded if image.dim() >= 4 else padded.squeeze(0)), (h, w)


def crop_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the last two dimensions back to ``size`` = (H, W) (top-left corner kept)."""
    return image[..., : size[0], : size[1]]


def to_255(image: torch.Tensor | np.ndarray, rounding: bool) -> np.ndarray:
    """Clamp to [0, 1], scale to [0, 255] as float64, and round to integers when ``rounding``."""
    array = (
        image.detach().cpu().double().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, np.float64)
    )
    scaled = np.clip(array, 0.0, 1.0) * 255.0
    return np.round(scaled) if rounding else scaled


def psnr_255(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR with peak 255 over all samples (``inf`` for identical images)."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise InputError(f"PSNR of images of different shapes {reference.shape} and {test.shape}")
    mse = np.mean((reference - test) ** 2)
    return math.inf if mse == 0 else 20.0 * math.log10(255.0 / math.sqrt(mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_matlab(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """MATLAB-style SSIM of (C, H, W) or (H, W) images: valid-region mean per channel, averaged.

    Args:
        reference: clean image, float values on a ``data_range`` scale.
        test: image compared with it, same shape.
        data_range: peak value (255 for this protocol).
    """
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise InputError(f"SSIM of images of different shapes {reference.shape} and {test.shape}")
    if reference.ndim == 2:
        reference, test = reference[None], test[None]
    if min(reference.shape[-2:]) < 11:
        raise InputError(f"SSIM needs images of at least 11x11 pixels, got {reference.shape[-2:]}")
    window = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def local_mean(x: np.ndarray) -> np.ndarray:
        # separable correlation; only the valid region (the window inside the image) is kept
        return correlate1d(correlate1d(x, window, axis=-1), window, axis=-2)[..., 5:-5, 5:-5]

    values = []
    for x, y in zip(reference, test):
        mu_x, mu_y = local_mean(x), local_mean(y)
        var_x = local_mean(x * x) - mu_x**2
        var_y = local_mean(y * y) - mu_y**2
        cov = local_mean(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )
        values.append(ssim_map.mean())
    return float(np.mean(values))


def rgb_metrics(
    clean: torch.Tensor | np.ndarray, output: torch.Tensor | np.ndarray, protocol: str = "synthetic"
) -> dict[str, float]:
    """PSNR and SSIM of a (C, H, W) image in [0, 1] against the clean one, under a reference protocol.

    Args:
        clean: clean image in [0, 1] (for "srgb" normally k/255 values read from an 8-bit file).
        output: denoised (or noisy) image, any range: it is clamped to [0, 1].
        protocol: "synthetic" (x255, no rounding) or "srgb" (x255, rounded to uint8).

    Returns:
        ``{"psnr": dB, "ssim": value}``.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown RGB metric protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    rounding = protocol == "srgb"
    reference = to_255(clean, rounding)
    test = to_255(output, rounding)
    return {"psnr": psnr_255(reference, test), "ssim": ssim_matlab(reference, test)}
