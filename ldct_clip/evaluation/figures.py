"""Figures of the evaluation reports, as matplotlib figures: the caller decides where they go
(:func:`save_figure` writes a PNG).

Built on ``matplotlib.figure.Figure`` without pyplot: no global state, no display backend, nothing to
close. Every slice panel function can draw into a sub-figure (``figure=``), which is how the demo composes
its single comparison figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Rectangle

from ldct_clip.conventions import BODY_THRESHOLD_HU, window_bounds
from ldct_clip.evaluation.roi import Roi

__all__ = [
    "plot_comparison",
    "plot_differences",
    "plot_nps",
    "plot_robustness",
    "plot_slices",
    "save_figure",
]

PANEL_INCHES = 3.0
#: How far below the highest NPS value the axis may reach (a curve that is ~0 at some frequency would
#: otherwise stretch the axis over tens of decades and flatten every other curve).
NPS_DECADES = 5


def _figure_for(n_panels: int, n_rows: int) -> Figure:
    return Figure(figsize=(PANEL_INCHES * n_panels + 0.8, PANEL_INCHES * n_rows + 0.6), layout="constrained")


def _axes(figure: Figure | SubFigure, n_rows: int, n_panels: int) -> np.ndarray:
    axes = figure.subplots(n_rows, n_panels, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def _outline(ax, roi: Roi, colour: str) -> None:
    ax.add_patch(
        Rectangle(
            (roi[1].start - 0.5, roi[0].start - 0.5),
            roi[1].stop - roi[1].start,
            roi[0].stop - roi[0].start,
            fill=False,
            edgecolor=colour,
            linewidth=1.0,
        )
    )


def plot_slices(
    images: Mapping[str, np.ndarray],
    window: str | Sequence[float],
    crop: Roi | None = None,
    flat_roi: Roi | None = None,
    title: str = "",
    figure: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """One slice per image in the same window, with a zoomed crop below.

    Args:
        images: display-ready 2-D HU images (``ldct_clip.evaluation.display``), in column order (low dose,
            the methods, normal dose).
        window: grey-scale window for every panel: a ``conventions.WINDOWS`` name or ``(lower, upper)`` HU.
        crop: the zoomed region (outlined in yellow on the first row); None for no zoom row.
        flat_roi: the noise ROI (outlined in cyan on the first row).
        title: figure title (the window is appended).
        figure: a figure or sub-figure to draw into; default a new figure.
    """
    names = list(images)
    n_rows = 2 if crop is not None else 1
    figure = figure if figure is not None else _figure_for(len(names), n_rows)
    axes = _axes(figure, n_rows, len(names))
    lo, hi = window_bounds(window)
    for j, name in enumerate(names):
        image = images[name]
        axes[0, j].imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        axes[0, j].set_title(name, fontsize=10)
        for roi, colour in ((crop, "yellow"), (flat_roi, "cyan")):
            if roi is not None:
                _outline(axes[0, j], roi, colour)
        if crop is not None:
            axes[1, j].imshow(image[crop], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            axes[1, j].set_title(f"{name} (zoom)", fontsize=9)
    figure.suptitle(f"{title}  window [{lo:g}, {hi:g}] HU".strip(), fontsize=11)
    return figure


def plot_differences(
    images: Mapping[str, np.ndarray],
    reference: np.ndarray,
    limit: float | None = None,
    title: str = "",
    figure: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """Difference maps ``image - reference`` (HU) on one symmetric colour scale.

    Args:
        images: display-ready 2-D HU images (low dose and the methods).
        reference: the normal-dose image, same arrangement.
        limit: the colour scale is ``[-limit, limit]`` HU for every panel; default: the 99th percentile of
            the first panel's absolute difference inside the body (the low dose's: every method is shown on
            the scale of the noise it set out to remove, larger errors saturate).
        title: figure title.
        figure: a figure or sub-figure to draw into; default a new figure.
    """
    ref = np.asarray(reference, dtype=np.float64)
    diffs = {name: np.asarray(image, dtype=np.float64) - ref for name, image in images.items()}
    if limit is None and diffs:
        body = ref > BODY_THRESHOLD_HU
        first = np.abs(next(iter(diffs.values())))
        limit = float(np.percentile(first[body] if body.any() else first, 99))
    limit = max(float(limit or 0.0), 1e-6)
    figure = figure if figure is not None else _figure_for(len(diffs), 1)
    axes = _axes(figure, 1, len(diffs))
    shown = None
    for j, (name, diff) in enumerate(diffs.items()):
        shown = axes[0, j].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes[0, j].set_title(f"{name} - normal dose", fontsize=10)
    figure.colorbar(shown, ax=list(axes.ravel()), shrink=0.8, label="HU")
    figure.suptitle(f"{title}  colour scale ±{limit:.0f} HU".strip(), fontsize=11)
    return figure


def plot_comparison(
    images: Mapping[str, np.ndarray],
    reference: str,
    window: str | Sequence[float],
    crop: Roi | None = None,
    flat_roi: Roi | None = None,
    title: str = "",
    differences_title: str = "differences to normal dose",
) -> Figure:
    """One figure: the slices in one window with a zoomed crop (:func:`plot_slices`) above the difference
    maps of the other images to ``images[reference]`` (:func:`plot_differences`).

    Args:
        images: display-ready 2-D HU images in column order, the normal dose among them.
        reference: the key of the normal-dose image.
        window, crop, flat_roi, title: as :func:`plot_slices`.
        differences_title: title of the difference row.
    """
    others = {name: image for name, image in images.items() if name != reference}
    slice_rows = 2 if crop is not None else 1
    heights = (PANEL_INCHES * slice_rows + 0.6, PANEL_INCHES + 0.6)
    figure = Figure(figsize=(PANEL_INCHES * len(images) + 0.8, sum(heights)), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=heights)
    plot_slices(images, window, crop=crop, flat_roi=flat_roi, title=title, figure=top)
    plot_differences(others, images[reference], title=differences_title, figure=bottom)
    return figure


def _nps_limits(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float] | None:
    """Log-axis limits from the curves' values above zero frequency (the zero-frequency ring is ~0 by
    construction: the ROI mean is removed), at most :data:`NPS_DECADES` decades below the top."""
    values = np.concatenate(
        [
            np.asarray(nps, np.float64)[(np.asarray(freq) > 0) & (np.asarray(nps) > 0)]
            for freq, nps in curves.values()
        ]
        or [np.empty(0)]
    )
    if values.size == 0:
        return None
    top = float(values.max())
    bottom = max(float(values.min()), top * 10.0**-NPS_DECADES)
    return bottom / 1.5, top * 1.5


def plot_nps(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "", spacing_known: bool = True
) -> Figure:
    """Radially averaged NPS curves (HU^2 mm^2, log scale, limits from the data) against spatial frequency
    (mm^-1), zero frequency left out; with ``spacing_known=False`` the axes say that the pixel was taken as
    1 mm."""
    figure = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = figure.subplots()
    for name, (freq, nps) in curves.items():
        freq, nps = np.asarray(freq), np.asarray(nps)
        shown = (freq > 0) & (nps > 0)
        ax.plot(freq[shown], nps[shown], marker=".", label=name)
    ax.set_yscale("log")
    limits = _nps_limits(curves)
    if limits is not None:
        ax.set_ylim(*limits)
    unknown = "" if spacing_known else ", pixel spacing unknown: 1 mm assumed"
    ax.set_xlabel(f"spatial frequency (mm$^{{-1}}${unknown})")
    ax.set_ylabel("NPS (HU$^2$ mm$^2$)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title or "noise power spectrum of (image - normal dose)", fontsize=10)
    return figure


def plot_robustness(
    summary: Sequence[Mapping[str, object]], title: str = "", level_labels: Mapping[str, str] | None = None
) -> Figure:
    """PSNR and SSIM against noise level, noisy input and denoised, one column per noise type.

    Args:
        summary: rows with ``noise``, ``level``, ``psnr_noisy``, ``psnr_denoised``, ``ssim_noisy``,
            ``ssim_denoised``, in level order per noise.
        title: figure title.
        level_labels: noise type -> x-axis label (default "level").
    """
    labels = level_labels or {}
    noises = list(dict.fromkeys(str(s["noise"]) for s in summary))
    figure = Figure(figsize=(3.6 * len(noises), 6), layout="constrained")
    axes = figure.subplots(2, len(noises), squeeze=False)
    for column, noise in enumerate(noises):
        entries = [s for s in summary if s["noise"] == noise]
        levels = [float(s["level"]) for s in entries]
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row][column]
            ax.plot(
                levels,
                [float(s[f"{metric}_noisy"]) for s in entries],
                "o--",
                color="0.5",
                label="noisy input",
            )
            ax.plot(
                levels, [float(s[f"{metric}_denoised"]) for s in entries], "o-", color="C0", label="denoised"
            )
            ax.set_xlabel(labels.get(noise, "level"))
            ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
            if row == 0:
                ax.set_title(noise)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    figure.suptitle(title)
    return figure


def save_figure(figure: Figure | SubFigure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` (or the figure a sub-figure belongs to) as a PNG; returns the path."""
    path = Path(path)
    (figure.figure if isinstance(figure, SubFigure) else figure).savefig(path, dpi=dpi)
    return path
