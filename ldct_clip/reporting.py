"""Noise measurements, figures and the written report of ``ldct-clip benchmark``.

Measurements, all taken on 2-D slices in HU:

- noise standard deviation in a flat region: the ROI is chosen once per slice on the *normal-dose* image
  (the k x k window inside the body with the lowest standard deviation) and reused for every method, so
  every method is measured on the same pixels;
- noise power spectrum (NPS) of the difference to normal dose in a larger flat ROI, mean removed,
  averaged over slices, radially averaged: HU^2 mm^2 against spatial frequency in mm^-1. The normal-dose
  image has noise of its own, which every difference contains alike: it is the floor of every curve.

Figures are written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ldct_clip.errors import InputError  # noqa: E402

__all__ = [
    "BODY_THRESHOLD_HU",
    "display_pixel_spacing",
    "display_slice",
    "find_detail_crop",
    "find_flat_roi",
    "noise_power_spectrum",
    "plot_differences",
    "plot_nps",
    "plot_slices",
    "radial_average",
    "roi_size",
    "roi_std",
    "write_csv",
    "write_json",
]

BODY_THRESHOLD_HU = -500.0

Roi = tuple[slice, slice]


def roi_size(shape: Sequence[int], fraction: float, minimum: int, maximum: int) -> int:
    """Side of a square ROI: ``fraction`` of the smaller image side, clamped to ``[minimum, maximum]`` and
    to the image."""
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


def find_flat_roi(reference_hu: np.ndarray, size: int, body_threshold_hu: float = BODY_THRESHOLD_HU) -> Roi:
    """The ``size`` x ``size`` window inside the body where the reference image is flattest.

    Args:
        reference_hu: 2-D normal-dose slice in HU; the ROI is then reused for every image of that slice.
        size: side of the window, pixels.
        body_threshold_hu: pixels above this value belong to the body; the window must lie inside it.

    Returns:
        ``(rows, cols)`` slices indexing the ROI.
    """
    ref = np.asarray(reference_hu, dtype=np.float64)
    if ref.ndim != 2 or min(ref.shape) < size or size < 2:
        raise InputError(f"cannot place a {size}x{size} ROI in an image of shape {ref.shape}")
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
    ref = np.asarray(reference_hu, dtype=np.float64)
    if ref.ndim != 2 or min(ref.shape) < size or size < 2:
        raise InputError(f"cannot place a {size}x{size} crop in an image of shape {ref.shape}")
    # Clip to a soft-tissue-to-bone range so that the body outline (air edge) does not dominate.
    gy, gx = np.gradient(np.clip(ref, -200.0, 1000.0))
    energy = _window_sums(np.hypot(gy, gx), size)
    energy[~_body_windows(ref, size, body_threshold_hu)] = -np.inf
    r, c = np.unravel_index(int(np.argmax(energy)), energy.shape)
    return slice(int(r), int(r) + size), slice(int(c), int(c) + size)


def roi_std(image_hu: np.ndarray, roi: Roi) -> float:
    """Sample standard deviation (ddof=1) of ``image_hu`` inside ``roi``, HU."""
    return float(np.std(np.asarray(image_hu, dtype=np.float64)[roi], ddof=1))


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


def display_slice(slice_xy: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """A slice ``(X, Y)`` of a RAS volume arranged for display in the radiological convention: anterior at
    the top, the patient's right on the viewer's left. Without an affine the voxel axes are taken as RAS.

    The voxel axes of a loaded volume need not follow RAS (MONAI keeps the file's order unless told to
    reorient), so the flips come from the affine's direction cosines.
    """
    image = np.asarray(slice_xy)
    if affine is None:
        affine = np.eye(4)
    directions = np.asarray(affine, dtype=np.float64)[:3, :2]
    world_axis = np.argmax(np.abs(directions), axis=0)
    sign = np.sign(directions[world_axis, [0, 1]])
    if world_axis[0] == 1:  # voxel axis 0 runs anterior-posterior: make it the second axis
        image, world_axis, sign = image.T, world_axis[::-1], sign[::-1]
    # Now axis 0 runs along world x (R+) and axis 1 along world y (A+). Rows: anterior (max y) at the top;
    # columns: the patient's right (max x) on the left.
    image = image.T  # rows = y, cols = x
    if sign[1] > 0:
        image = image[::-1, :]
    if sign[0] > 0:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def display_pixel_spacing(affine: np.ndarray | None) -> tuple[float, float] | None:
    """``(row, column)`` pixel spacing in mm of the slices ``display_slice`` returns; None without affine."""
    if affine is None:
        return None
    directions = np.asarray(affine, dtype=np.float64)[:3, :2]
    spacing = np.linalg.norm(directions, axis=0)
    # display_slice puts the voxel axis that runs along world y (anterior-posterior) on the rows.
    row_axis = 0 if np.argmax(np.abs(directions[:, 0])) == 1 else 1
    return float(spacing[row_axis]), float(spacing[1 - row_axis])


def _panel_grid(n_panels: int, n_rows: int, panel_inches: float = 3.0):
    fig, axes = plt.subplots(
        n_rows,
        n_panels,
        figsize=(panel_inches * n_panels + 0.8, panel_inches * n_rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def plot_slices(
    images: Mapping[str, np.ndarray],
    window: tuple[float, float],
    path: str | Path,
    crop: Roi | None = None,
    flat_roi: Roi | None = None,
    title: str = "",
) -> Path:
    """One slice per method in the same window, with a zoomed crop below.

    Args:
        images: display-ready 2-D HU images, in column order (low dose, the methods, normal dose).
        window: ``(lower, upper)`` HU of the grey scale, the same for every panel.
        path: PNG file to write.
        crop: the zoomed region (outlined in yellow on the first row); None for no zoom row.
        flat_roi: the noise ROI (outlined in cyan on the first row).
        title: figure title.
    """
    names = list(images)
    fig, axes = _panel_grid(len(names), 2 if crop is not None else 1)
    lo, hi = window
    for j, name in enumerate(names):
        image = images[name]
        axes[0, j].imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        axes[0, j].set_title(name, fontsize=10)
        for roi, colour in ((crop, "yellow"), (flat_roi, "cyan")):
            if roi is not None:
                axes[0, j].add_patch(
                    Rectangle(
                        (roi[1].start - 0.5, roi[0].start - 0.5),
                        roi[1].stop - roi[1].start,
                        roi[0].stop - roi[0].start,
                        fill=False,
                        edgecolor=colour,
                        linewidth=1.0,
                    )
                )
        if crop is not None:
            axes[1, j].imshow(image[crop], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            axes[1, j].set_title(f"{name} (zoom)", fontsize=9)
    fig.suptitle(f"{title}  window [{lo:g}, {hi:g}] HU".strip(), fontsize=11)
    return _save(fig, path)


def plot_differences(
    images: Mapping[str, np.ndarray],
    reference: np.ndarray,
    path: str | Path,
    limit: float | None = None,
    title: str = "",
) -> Path:
    """Difference maps ``image - reference`` (HU) on one symmetric colour scale.

    Args:
        images: display-ready 2-D HU images (low dose and the methods).
        reference: the normal-dose image, same arrangement.
        path: PNG file to write.
        limit: the colour scale is ``[-limit, limit]`` HU for every panel; default: the 99th percentile of
            the first panel's absolute difference inside the body (the low dose's: every method is shown on
            the scale of the noise it set out to remove, larger errors saturate).
        title: figure title.
    """
    ref = np.asarray(reference, dtype=np.float64)
    diffs = {name: np.asarray(image, dtype=np.float64) - ref for name, image in images.items()}
    if limit is None and diffs:
        body = ref > BODY_THRESHOLD_HU
        first = np.abs(next(iter(diffs.values())))
        limit = float(np.percentile(first[body] if body.any() else first, 99))
    limit = max(float(limit or 0.0), 1e-6)
    fig, axes = _panel_grid(len(diffs), 1)
    shown = None
    for j, (name, diff) in enumerate(diffs.items()):
        shown = axes[0, j].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes[0, j].set_title(f"{name} - normal dose", fontsize=10)
    fig.colorbar(shown, ax=list(axes.ravel()), shrink=0.8, label="HU")
    fig.suptitle(f"{title}  colour scale ±{limit:.0f} HU".strip(), fontsize=11)
    return _save(fig, path)


def plot_nps(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
    spacing_known: bool = True,
) -> Path:
    """Radially averaged NPS curves (HU^2 mm^2, log scale) against spatial frequency (mm^-1); with
    ``spacing_known=False`` the axes say that the pixel was taken as 1 mm."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2), layout="constrained")
    for name, (freq, nps) in curves.items():
        positive = np.asarray(nps) > 0
        ax.plot(np.asarray(freq)[positive], np.asarray(nps)[positive], marker=".", label=name)
    ax.set_yscale("log")
    unknown = "" if spacing_known else ", pixel spacing unknown: 1 mm assumed"
    ax.set_xlabel(f"spatial frequency (mm$^{{-1}}${unknown})")
    ax.set_ylabel("NPS (HU$^2$ mm$^2$)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title or "noise power spectrum of (image - normal dose)", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Rows of dicts to CSV; the columns are the union of the keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_json(data: object, path: str | Path) -> Path:
    """JSON with NaN/inf written as null (strict JSON readers reject NaN)."""
    path = Path(path)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")
    return path


def _finite(value: object) -> object:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_finite(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
