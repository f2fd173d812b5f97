"""Measurements in regions of a CT slice: the flat region where noise is measured, the detailed region a
figure zooms into, the noise standard deviation, and the noise power spectrum (NPS).

All on 2-D slices in HU. The noise ROI is chosen once per slice on the *normal-dose* image (the k x k
window inside the body with the lowest standard deviation) and reused for every image of that slice, so
every method is measured on the same pixels (:func:`flat_roi_noise`, the one noise measure of the reports).
The NPS is that of the difference to normal dose in a larger flat ROI, mean removed, averaged over slices
and radially averaged: HU^2 mm^2 against spatial frequency in mm^-1. The normal-dose image has noise of its
own, which every difference contains alike: it is the floor of every curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ldct_clip.conventions import BODY_THRESHOLD_HU
from ldct_clip.errors import InputError

__all__ = [
    "DETAIL_CROP",
    "NOISE_ROI",
    "NPS_ROI",
    "NPSAccumulator",
    "Roi",
    "find_detail_crop",
    "find_flat_roi",
    "flat_roi_noise",
    "noise_power_spectrum",
    "radial_average",
    "roi_size",
    "roi_std",
]

Roi = tuple[slice, slice]

#: ROI sides as (fraction of the smaller image side, minimum, maximum) pixels: the noise-std ROI (small
#: enough to fit between organ edges), the NPS ROI (large enough for a spectrum), the figures' zoom.
NOISE_ROI = (1 / 8, 8, 32)
NPS_ROI = (1 / 4, 8, 128)
DETAIL_CROP = (1 / 4, 16, 160)


def roi_size(shape: Sequence[int], fraction: float, minimum: int, maximum: int) -> int:
    """Side of a square ROI: ``fraction`` of the smaller image side, clamped to ``[minimum, maximum]`` and
    to the image (the sizes of the reports: :data:`NOISE_ROI`, :data:`NPS_ROI`, :data:`DETAIL_CROP`)."""
    side = int(round(min(shape) * fraction))
    return int(min(max(side, minimum), maximum, min(shape)))


def _window_sums(a: np.ndarray, k: int) -> np.ndarray:
    """Sums of ``a`` over every k x k window lying fully inside it (index = top-left corner).

    An integral image rather than ``scipy.ndimage.uniform_filter``: it gives exactly the "valid" windows
    for even and odd k, in O(pixels) whatever k is.
    """
    integral = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1)
    return integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]


def _body_windows(reference_hu: np.ndarray, k: int, body_threshold_hu: float) -> np.ndarray:
    """Boolean map over window corners: True where the k x k window lies entirely inside the body. When no
    window does (a small or thin body), every window is allowed."""
    inside = _window_sums((reference_hu > body_threshold_hu).astype(np.float64), k) >= k * k - 0.5
    return inside if inside.any() else np.ones_like(inside)


def _checked(reference_hu: np.ndarray, size: int, what: str) -> np.ndarray:
    ref = np.asarray(reference_hu, dtype=np.float64)
    if ref.ndim != 2 or min(ref.shape) < size or size < 2:
        raise InputError(f"cannot place a {size}x{size} {what} in an image of shape {ref.shape}")
    return ref


def find_flat_roi(reference_hu: np.ndarray, size: int, body_threshold_hu: float = BODY_THRESHOLD_HU) -> Roi:
    """The ``size`` x ``size`` window inside the body where the reference image is flattest.

    Args:
        reference_hu: 2-D normal-dose slice in HU; the ROI is then reused for every image of that slice.
        size: side of the window, pixels.
        body_threshold_hu: pixels above this value belong to the body; the window must lie inside it.

    Returns:
        ``(rows, cols)`` slices indexing the ROI.
    """
    ref = _checked(reference_hu, size, "ROI")
    n = float(size * size)
    mean = _window_sums(ref, size) / n
    variance = np.maximum(_window_sums(ref * ref, size) / n - mean * mean, 0.0)
    variance[~_body_windows(ref, size, body_threshold_hu)] = np.inf
    r, c = np.unravel_index(int(np.argmin(variance)), variance.shape)
    return slice(int(r), int(r) + size), slice(int(c), int(c) + size)


def find_detail_crop(
    reference_hu: np.ndarray, size: int, body_threshold_hu: float = BODY_THRESHOLD_HU
) -> Roi:
    """The ``size`` x ``size`` window inside the body with the most edges (largest mean gradient magnitude of
    the reference): the zoomed crop of the figures, where blurring and residual noise show."""
    ref = _checked(reference_hu, size, "crop")
    # Clip to a soft-tissue-to-bone range so that the body outline (air edge) does not dominate.
    gy, gx = np.gradient(np.clip(ref, -200.0, 1000.0))
    energy = _window_sums(np.hypot(gy, gx), size)
    energy[~_body_windows(ref, size, body_threshold_hu)] = -np.inf
    r, c = np.unravel_index(int(np.argmax(energy)), energy.shape)
    return slice(int(r), int(r) + size), slice(int(c), int(c) + size)


def roi_std(image_hu: np.ndarray, roi: Roi) -> float:
    """Sample standard deviation (ddof=1) of ``image_hu`` inside ``roi``, HU."""
    return float(np.std(np.asarray(image_hu, dtype=np.float64)[roi], ddof=1))


def flat_roi_noise(
    images: Mapping[str, np.ndarray], reference_hu: np.ndarray
) -> tuple[Roi, dict[str, float]]:
    """Noise of each image of one slice: the sample std (HU) inside the flattest :data:`NOISE_ROI` window of
    the normal-dose slice, the same pixels for every image.

    Args:
        images: name -> 2-D HU slice (low dose, methods; include the normal dose to measure it too).
        reference_hu: the normal-dose slice, same arrangement; it places the ROI.

    Returns:
        ``(roi, {name: std})``.
    """
    reference = np.asarray(reference_hu, dtype=np.float64)
    roi = find_flat_roi(reference, roi_size(reference.shape, *NOISE_ROI))
    return roi, {name: roi_std(image, roi) for name, image in images.items()}


def noise_power_spectrum(
    noise: np.ndarray, pixel_spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D noise power spectrum of noise-only ROIs (ICRU 87 / IEC 62220 definition).

    ``NPS(f) = dx dy / (Nx Ny) * <|DFT(n - mean(n))|^2>``, averaged over the realisations. With this
    normalisation the integral of the NPS over frequency equals the variance (Parseval).

    Args:
        noise: one ROI ``(H, W)`` or a stack of equally sized ROIs ``(N, H, W)``, HU.
        pixel_spacing: ``(row spacing, column spacing)``, mm.

    Returns:
        ``(nps, freq_rows, freq_cols)``: the NPS in HU^2 mm^2, zero frequency centred (fftshift), and the
        frequencies of its rows and columns in mm^-1.
    """
    n = np.asarray(noise, dtype=np.float64)
    if n.ndim == 2:
        n = n[None]
    if n.ndim != 3 or min(n.shape[1:]) < 2:
        raise InputError(f"the NPS needs 2-D ROIs of at least 2x2 pixels, got shape {np.shape(noise)}")
    dy, dx = (float(s) for s in pixel_spacing)
    h, w = n.shape[1:]
    n = n - n.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(n)) ** 2, axis=0) * (dx * dy) / (h * w)
    freq_rows = np.fft.fftshift(np.fft.fftfreq(h, d=dy))
    freq_cols = np.fft.fftshift(np.fft.fftfreq(w, d=dx))
    return np.fft.fftshift(power), freq_rows, freq_cols


def radial_average(
    nps: np.ndarray, freq_rows: np.ndarray, freq_cols: np.ndarray, bin_width: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Radial average of a centred 2-D NPS in rings of ``bin_width`` mm^-1 (default: the coarser of the two
    frequency steps), up to the lower Nyquist frequency.

    Returns:
        ``(frequency, nps)``: ring centres in mm^-1 and the mean NPS in each non-empty ring.
    """
    steps = [abs(float(f[1] - f[0])) for f in (freq_rows, freq_cols) if len(f) > 1]
    width = float(bin_width) if bin_width else max(steps)
    nyquist = min(float(np.max(np.abs(freq_rows))), float(np.max(np.abs(freq_cols))))
    radius = np.hypot(*np.meshgrid(freq_rows, freq_cols, indexing="ij"))
    ring = np.floor(radius / width + 0.5).astype(int)
    keep = radius <= nyquist + 1e-12
    counts = np.bincount(ring[keep])
    sums = np.bincount(ring[keep], weights=np.asarray(nps, dtype=np.float64)[keep])
    nonempty = counts > 0
    return np.arange(len(counts))[nonempty] * width, sums[nonempty] / counts[nonempty]


class NPSAccumulator:
    """Mean 2-D NPS of (image - normal dose) per image kind over slices of one pixel spacing and ROI size.

    Spectra of different pixel spacings have different frequency axes and cannot be averaged: the first
    slice fixes the spacing, and slices of other spacings are left out (:attr:`slices` says how many went
    in). The ROI of each slice is the flattest :data:`NPS_ROI` window of the normal-dose slice.
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.key: tuple | None = None
        self.freqs: tuple[np.ndarray, np.ndarray] | None = None
        self.slices = 0

    @property
    def roi_px(self) -> int | None:
        """Side of the NPS ROI in pixels (None before the first slice)."""
        return self.key[1] if self.key else None

    def add(
        self, images: Mapping[str, np.ndarray], reference: np.ndarray, spacing: Sequence[float] | None
    ) -> None:
        """Add one slice: ``images`` (name -> 2-D HU) against the normal-dose ``reference``; ``spacing``
        (row, column) mm, or None for 1 mm."""
        roi = find_flat_roi(reference, roi_size(reference.shape, *NPS_ROI))
        key = (tuple(spacing) if spacing else None, roi[0].stop - roi[0].start, roi[1].stop - roi[1].start)
        if self.key is None:
            self.key = key
        if key != self.key:
            return
        for name, image in images.items():
            power, fr, fc = noise_power_spectrum(image[roi] - reference[roi], spacing or (1.0, 1.0))
            self.sums[name] = self.sums.get(name, 0.0) + power
            self.counts[name] = self.counts.get(name, 0) + 1
            self.freqs = (fr, fc)
        self.slices += 1

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> ``(frequency mm^-1, NPS HU^2 mm^2)``, radially averaged."""
        if self.freqs is None:
            return {}
        return {
            name: radial_average(total / self.counts[name], *self.freqs) for name, total in self.sums.items()
        }
