"""Whole volumes: :func:`simulate_low_dose` runs the per-slice noise of ``ldct_clip.simulation.projection``
over the axial slices (in a process pool), keeps padding and the input's type, and reads the pixel spacing
and slice thickness a volume is simulated with.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch
from tqdm.auto import tqdm

from ldct_clip.conventions import FOV_PADDING_THRESHOLD_HU
from ldct_clip.errors import InputError
from ldct_clip.io.dicom_series import DicomSeries, select_series
from ldct_clip.simulation.physics import (
    DEFAULT_ELECTRONIC_NOISE,
    DEFAULT_N_VIEWS,
    DEFAULT_PHOTONS,
    MU_WATER_PER_MM,
    REFERENCE_THICKNESS,
)
from ldct_clip.simulation.projection import make_geometry, slice_worker

__all__ = ["as_slice_stack", "simulate_low_dose", "slice_thickness"]


def _in_plane_spacing(volume, spacing: float | tuple[float, float] | None) -> float:
    if spacing is None:
        pixdim = getattr(volume, "pixdim", None)
        if pixdim is None:
            raise InputError(
                "the in-plane pixel spacing is unknown for a plain array: pass spacing=<pixel size in mm>"
            )
        spacing = tuple(float(v) for v in np.asarray(pixdim).ravel()[:2])
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if values.size not in (1, 2) or not np.all(np.isfinite(values) & (values > 0)):
        raise InputError(f"spacing must be one or two positive pixel sizes in mm, got {spacing}")
    if abs(values.max() / values.min() - 1.0) > 0.01:
        raise InputError(
            f"in-plane pixels are not square ({values[0]:g} x {values[1]:g} mm): resample the volume to "
            "square pixels first (e.g. monai.transforms.Spacing)"
        )
    return float(values.mean())


def as_slice_stack(array: np.ndarray) -> np.ndarray:
    """View of the data as (X, Y, Z): accepts (X, Y), (X, Y, Z) and (1, X, Y, Z)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        return array
    if array.ndim == 4 and array.shape[0] == 1:
        return array[0]
    raise InputError(
        f"expected a CT volume of shape (1, X, Y, Z), (X, Y, Z) or a slice (X, Y), got shape {array.shape}"
    )


def slice_thickness(volume, series: DicomSeries | None = None) -> float:
    """The slice thickness (mm) to simulate a volume with: the DICOM SliceThickness of its source series,
    else the spacing between its slices, else :data:`REFERENCE_THICKNESS`.

    Args:
        volume: a ``MetaTensor`` from ``ldct_clip.io.load_ct``.
        series: the volume's source series when the caller has it; else, for a DICOM volume, the series
            its meta names is read again (headers only).
    """
    meta = getattr(volume, "meta", {})
    if series is not None or meta.get("source_kind") == "dicom":
        try:
            if series is None:
                series = select_series(meta["source_path"], meta.get("series_uid") or None, allow_non_ct=True)
            thickness = float(series.headers[0].dataset.get("SliceThickness") or 0)
        except (InputError, KeyError, TypeError, ValueError):
            thickness = 0.0
        if thickness > 0:
            return thickness
    pixdim = getattr(volume, "pixdim", None)
    if pixdim is not None and len(pixdim) > 2 and float(pixdim[2]) > 0:
        return float(pixdim[2])
    return REFERENCE_THICKNESS


def _default_workers(n_slices: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, n_slices))


def simulate_low_dose(
    volume_hu,
    dose: float = 0.25,
    photons: float = DEFAULT_PHOTONS,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    n_views: int = DEFAULT_N_VIEWS,
    spacing: float | tuple[float, float] | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    slice_thickness: float = REFERENCE_THICKNESS,
    mu_water: float = MU_WATER_PER_MM,
    filter_name: str = "ramp",
    padding_hu: float = FOV_PADDING_THRESHOLD_HU,
    modulation: bool = True,
    projection_downsample: int | None = None,
):
    """Simulate a lower-dose scan of a normal-dose CT volume: normal dose + FBP(projection noise).

    See the ``ldct_clip.simulation`` package docstring for the noise model. Axial slices run along the last
    axis and are simulated independently (in parallel processes); slice ``z`` draws its noise from
    ``numpy.random.default_rng([seed, z])``, so the result does not depend on ``workers``. ``dose=1.0``
    returns an unchanged copy.

    Args:
        volume_hu: HU volume, a ``MetaTensor`` (1, X, Y, Z) from ``ldct_clip.io.load_ct`` (affine and meta
            are kept), a tensor or numpy array of shape (1, X, Y, Z), (X, Y, Z) or one slice (X, Y).
        dose: dose fraction in (0, 1] relative to the input (0.25: quarter dose).
        photons: full-dose photon fluence per view on 1 mm of detector for a 3 mm slice and 1000 views
            (scaled to the pixel size, ``slice_thickness`` and ``n_views``: the photon count convention of
            ``ldct_clip.simulation.physics``); ``ldct_clip.simulation.calibrate_photon_count`` picks it from a
            target noise std.
        electronic_noise: electronic noise std (counts per measurement).
        n_views: projection angles over 180 degrees (parallel beam); fewer is faster and noisier in texture
            but, by the photon convention, not in noise level.
        spacing: in-plane pixel size (mm); taken from the MetaTensor's affine when omitted.
        seed: base seed.
        workers: processes; default ``min(CPU count, number of slices)``; 1 runs in this process.
        progress: show a tqdm progress bar.
        slice_thickness: slice thickness (mm): thinner slices collect fewer photons.
        mu_water: attenuation of water (1/mm) at the effective energy.
        filter_name: FBP filter for the noise (``skimage.transform.iradon``: ramp, shepp-logan, cosine,
            hamming, hann); the ramp gives the sharpest texture.
        padding_hu: values below this (e.g. -3024 outside the field of view) are padding: no attenuation
            and left unchanged.
        modulation: share the photons between views as tube current modulation does (same dose, less
            noise and fewer streaks in non-round patients); False gives every view the same photons.
        projection_downsample: the line integrals that set the noise variance are projected on a grid this
            many times coarser, with this fraction of the views, and interpolated (1: full resolution;
            default 2 for slices of 256 pixels or more, else 1).

    Returns:
        the low-dose volume, of the input's type, shape and dtype.
    """
    if isinstance(volume_hu, torch.Tensor):
        array = volume_hu.detach().cpu().numpy()
    else:
        array = np.asarray(volume_hu)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"the CT volume must hold real HU values, got dtype {array.dtype}")
    stack = as_slice_stack(array)
    if not np.all(np.isfinite(stack)):
        raise InputError("the CT volume contains NaN or infinite values: fix or mask them before simulating")
    geometry = make_geometry(
        stack,
        dose,
        photons,
        electronic_noise,
        n_views,
        _in_plane_spacing(volume_hu, spacing),
        slice_thickness,
        mu_water,
        filter_name,
        padding_hu,
        modulation,
        projection_downsample,
    )
    if geometry.dose == 1.0:
        return _wrap(volume_hu, array.copy())

    low = stack.astype(np.float64, copy=True)
    n_slices = stack.shape[-1]
    workers = _default_workers(n_slices) if workers is None else max(1, min(int(workers), n_slices))
    with tqdm(total=n_slices, desc=f"simulate dose {dose:g}", unit="slice", disable=not progress) as bar:
        if workers == 1:
            results = (slice_worker(stack[..., z], geometry, seed, z) for z in range(n_slices))
            for z, noise in results:
                low[..., z] += noise
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(slice_worker, stack[..., z], geometry, seed, z) for z in range(n_slices)
                ]
                for future in as_completed(futures):
                    z, noise = future.result()
                    low[..., z] += noise
                    bar.update()
    padding = stack < geometry.padding_hu
    low[padding] = stack[padding]
    if not np.issubdtype(array.dtype, np.floating):
        limits = np.iinfo(array.dtype)
        low = np.clip(np.rint(low), limits.min, limits.max)
    out = np.empty_like(array)
    as_slice_stack(out)[...] = low
    return _wrap(volume_hu, out)


def _wrap(volume_hu, array: np.ndarray):
    """Return ``array`` as the input's type (MetaTensor keeps affine and meta)."""
    if isinstance(volume_hu, torch.Tensor):
        result = volume_hu.detach().clone()
        result.data = torch.from_numpy(array).to(volume_hu.device)
        return result
    return array
