"""Projection-domain low-dose simulation: insert the extra quantum noise of a lower dose into normal-dose CT.

The normal-dose image already carries the noise of its own dose, so the simulation adds only the
*difference*: low dose = normal dose + FBP(noise). Anatomy, resolution and the values outside the field of
view stay as they are. Per axial slice:

1. HU -> linear attenuation ``mu = mu_water * (1 + HU / 1000)`` (1/mm, clipped at 0; padding such as -3024
   counts as air), in physical units through the pixel spacing.
2. Parallel-beam forward projection with scikit-image ``radon`` (``n_views`` angles over 180 degrees, one
   detector bin per pixel): line integrals ``p = sum(mu) * spacing`` (dimensionless). They only set the
   noise variance, which varies slowly across bins and views, so slices of 256 pixels or more are by
   default projected on a 2x coarser grid with every other view and interpolated back
   (``projection_downsample=2``, half a pixel of misregistration of the variance map): on a 512 x 512
   abdomen slice this changes the noise std by < 0.5 % and makes the whole simulation ~3x faster.
3. Post-log noise ``delta_p ~ N(0, sigma_p^2)`` whose variance is the difference between the post-log
   variances at dose fraction ``d`` and at full dose (Yu et al. 2012, Med Phys 39:5525; Zeng et al. 2015,
   IEEE Trans Nucl Sci 62:2226). With ``N = I0 * exp(-p)`` the mean full-dose count of a ray (``I0``
   incident photons per detector bin and view) and ``sigma_e`` the electronic noise std (counts), a
   measured count has variance ``N + sigma_e^2`` (Poisson plus Gaussian), so after ``-log(count / I0)``

       var_full = (N + sigma_e^2) / N^2,     var_d = (d N + sigma_e^2) / (d N)^2,

       sigma_p^2 = var_d - var_full = (1 - d) / (d N) + (1 - d^2) sigma_e^2 / (d N)^2
                 = (1 - d) / d * exp(p) / I0 * (1 + (1 + d) sigma_e^2 / (d I0 exp(-p))).

   The noise is Gaussian (the second-order, linearised model of both papers): the full-dose counts are not
   available to thin, so only the extra variance can be added, and a zero-mean post-log perturbation
   leaves mean HU unbiased. Rays whose expected low-dose count ``d N`` falls below one photon are treated
   as one photon, as scanners correct photon-starved rays before reconstruction (otherwise a metal implant
   would inject unbounded noise).
4. Tube current modulation (on by default; scanners' automatic exposure control, CARE Dose4D in the Mayo
   data, does it): the same total photons are shared between the views as ``I0(theta) ~ sqrt(sum_bins
   exp(p))``, which minimises the summed image noise variance ``sum_theta sum_bins exp(p) / I0(theta)``
   at fixed dose (Gies et al. 1999, Med Phys 26:2235). Without it a wide patient gets the strong
   horizontal streaks of the lateral views. A water cylinder is not modulated (all views are alike).
5. Filtered back-projection (``iradon``, ramp filter by default) of ``delta_p`` alone, back to HU:
   ``delta_HU = 1000 * delta_mu / mu_water`` with ``delta_mu = FBP(delta_p) / spacing``.

Photon count convention: ``photons`` is the full-dose photon fluence per view for a detector bin of 1 mm
width and a slice of ``REFERENCE_THICKNESS`` (3 mm), in an acquisition of ``REFERENCE_VIEWS`` (1000) views
over 180 degrees. A bin is one pixel wide, so a slice of pixel size ``s`` and thickness ``t`` simulated with
``n_views`` views gets ``I0 = photons * (s / 1 mm) * (t / 3 mm) * (1000 / n_views)`` per bin and view: the
dose, and the image noise, do not depend on the angular sampling chosen, and the noise grows with smaller
pixels (std ~ s^-1.5) and thinner slices (std ~ t^-0.5) as on a scanner.

Field of view: ``radon(circle=True)`` needs the object inside the inscribed circle. When the volume has
tissue (> -500 HU) outside it, the whole volume is projected with ``circle=False`` (radon pads to the
diagonal, about twice the work); otherwise the inscribed-circle geometry is used and the pixels outside
it get no noise, as on scanners whose reconstruction field of view is that circle. Non-square slices are
padded with air to a square and cropped back. Values below ``ldct_clip.conventions.FOV_PADDING_THRESHOLD_HU``
are the scanner's padding outside its field of view (the project's one threshold, justified there): they
attenuate nothing and are left unchanged.

Default photon count: ``DEFAULT_PHOTONS = 6.9e6`` is what :func:`calibrate_photon_count` returns (6.7e6 to
6.9e6 over seeds) for an added noise std of 20 HU at quarter dose in the centre (50 mm ROI) of a 300 mm
water cylinder (a typical adult abdomen's water-equivalent diameter), 512 x 512 pixels of 0.7 mm, 3 mm
slice, ``sigma_e = 10``, 720 views, ramp filter. The Mayo 2016 quarter-dose data (3 mm, B30) have about 10-12 HU of noise in the
liver at full dose and 20-25 HU at quarter dose, i.e. ``sqrt(1/d - 1) * 11 ~ 19`` HU added. It is an
effective count for this 2D parallel-beam model (it stands for a whole slab of detector rows), not a
scanner's photons per detector element; use :func:`calibrate_photon_count` to match another scanner.

Each slice draws its noise from ``numpy.random.default_rng([seed, slice_index])``, so the result does not
depend on the number of worker processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from scipy.special import logsumexp
from skimage.transform import iradon, radon
from tqdm.auto import tqdm

from ldct_clip.conventions import FOV_PADDING_THRESHOLD_HU
from ldct_clip.data.phantom import make_water_cylinder
from ldct_clip.errors import InputError
from ldct_clip.io.dicom_series import DicomSeries, select_series

__all__ = [
    "DEFAULT_ELECTRONIC_NOISE",
    "DEFAULT_N_VIEWS",
    "DEFAULT_PHOTONS",
    "MU_WATER_PER_MM",
    "REFERENCE_THICKNESS",
    "REFERENCE_VIEWS",
    "added_postlog_variance",
    "calibrate_photon_count",
    "hu_to_mu",
    "measure_noise_std",
    "modulation_weights",
    "photons_per_bin",
    "simulate_low_dose",
    "simulate_noise_slice",
    "slice_thickness",
]

MU_WATER_PER_MM = 0.0192  # water at ~70 keV effective energy (NIST XCOM: 0.193 cm^2/g)
REFERENCE_VIEWS = 1000
REFERENCE_THICKNESS = 3.0
DEFAULT_N_VIEWS = 720
DEFAULT_ELECTRONIC_NOISE = 10.0
DEFAULT_PHOTONS = 6.9e6
TISSUE_HU = -500.0  # tissue outside the inscribed circle switches to the padded (full-square) geometry
ROI_PIXELS = 8000  # pooled ROI pixels of a calibration: std known to ~1 %
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


def hu_to_mu(
    hu: np.ndarray, mu_water: float = MU_WATER_PER_MM, padding_hu: float = FOV_PADDING_THRESHOLD_HU
) -> np.ndarray:
    """Linear attenuation (1/mm) of an HU image; negative values and padding (< ``padding_hu``) become 0.

    Args:
        hu: image in Hounsfield units.
        mu_water: attenuation of water (1/mm) at the effective energy.
        padding_hu: values below this are padding outside the reconstructed field of view.
    """
    hu = np.asarray(hu, dtype=np.float64)
    mu = mu_water * (1.0 + hu / 1000.0)
    mu[(hu < padding_hu) | (mu < 0)] = 0.0
    return mu


def added_postlog_variance(
    line_integrals: np.ndarray, dose: float, photons_per_view: float, electronic_noise: float
) -> np.ndarray:
    """Variance to add to post-log line integrals so that their noise matches dose fraction ``dose``.

    ``sigma_p^2 = (1 - d) / (d N) + (1 - d^2) sigma_e^2 / (d N)^2`` with ``N = I0 exp(-p)`` (see the module
    docstring), with the expected low-dose count ``d N`` floored at one photon.

    Args:
        line_integrals: ``p``, dimensionless.
        dose: dose fraction ``d`` in (0, 1].
        photons_per_view: incident photons ``I0`` per detector bin and view at full dose.
        electronic_noise: electronic noise std ``sigma_e`` in counts per measurement.
    """
    low_counts = np.maximum(
        dose * photons_per_view * np.exp(-np.asarray(line_integrals, dtype=np.float64)), 1.0
    )
    return (1.0 - dose) / low_counts + (1.0 - dose**2) * electronic_noise**2 / low_counts**2


def photons_per_bin(
    photons: float, spacing: float, n_views: int, slice_thickness: float = REFERENCE_THICKNESS
) -> float:
    """Incident photons ``I0`` per detector bin (one pixel wide) and view for the photon count convention.

    Args:
        photons: fluence per view on 1 mm of detector width for a 3 mm slice and 1000 views.
        spacing: pixel size (mm), the bin width.
        n_views: projection angles over 180 degrees.
        slice_thickness: slice thickness (mm).
    """
    return photons * spacing * (slice_thickness / REFERENCE_THICKNESS) * (REFERENCE_VIEWS / n_views)


def modulation_weights(line_integrals: np.ndarray) -> np.ndarray:
    """Relative photons per view (mean 1) of noise-optimal tube current modulation for a sinogram.

    ``w(theta) ~ sqrt(sum_bins exp(p))``: minimising ``sum_theta V(theta) / w(theta)`` under a fixed
    ``sum_theta w(theta)``, with ``V(theta) = sum_bins exp(p)`` the post-log variance a view contributes.

    Args:
        line_integrals: sinogram ``p`` of shape (bins, views).
    """
    log_weight = 0.5 * logsumexp(np.asarray(line_integrals, dtype=np.float64), axis=0)
    weight = np.exp(log_weight - log_weight.max())
    return weight * (weight.size / weight.sum())


@dataclass(frozen=True)
class _Geometry:
    dose: float
    photons: float
    electronic_noise: float
    n_views: int
    spacing: float
    slice_thickness: float
    mu_water: float
    filter_name: str
    padding_hu: float
    circle: bool
    modulation: bool
    projection_downsample: int


def _square(image: np.ndarray, fill: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Pad a slice to a centred square (radon's detector spans one side); return the crop back."""
    rows, cols = image.shape
    size = max(rows, cols)
    top, left = (size - rows) // 2, (size - cols) // 2
    square = np.full((size, size), fill, dtype=np.float64)
    crop = (slice(top, top + rows), slice(left, left + cols))
    square[crop] = image
    return square, crop


def _outside_circle(size: int) -> np.ndarray:
    """Pixels outside skimage's inscribed circle (same centre and radius as ``radon(circle=True)``)."""
    radius = size // 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 > radius**2


def _line_integrals(
    mu: np.ndarray, theta: np.ndarray, circle: bool, spacing: float, factor: int
) -> np.ndarray:
    """Sinogram of ``mu`` (square, 1/mm) in radon's layout, projected on a ``factor`` x coarser grid."""
    if factor == 1:
        return radon(mu, theta=theta, circle=circle, preserve_range=True) * spacing
    size = mu.shape[0]
    # Why not radon at full size: the sinogram only feeds the noise variance (see the module docstring).
    coarse_size = -(-size // factor)
    padded = np.zeros((coarse_size * factor,) * 2)
    padded[:size, :size] = mu
    coarse = padded.reshape(coarse_size, factor, coarse_size, factor).mean(axis=(1, 3))
    coarse_sinogram = (
        radon(coarse, theta=theta[::factor], circle=circle, preserve_range=True) * spacing * factor
    )
    bins = size if circle else int(np.ceil(np.sqrt(2) * size))
    # detector positions (pixels from the rotation centre) of the full grid, in coarse bins; views likewise
    rows = (np.arange(bins) - bins // 2) / factor + coarse_sinogram.shape[0] // 2
    cols = np.arange(theta.size) / factor
    grid = np.meshgrid(rows, cols, indexing="ij")
    return map_coordinates(coarse_sinogram, grid, order=1, mode="nearest")


def _noise_hu(slice_hu: np.ndarray, geometry: _Geometry, rng: np.random.Generator) -> np.ndarray:
    mu, crop = _square(hu_to_mu(slice_hu, geometry.mu_water, geometry.padding_hu), 0.0)
    size = mu.shape[0]
    if geometry.circle:
        mu[_outside_circle(size)] = 0.0  # only air or padding there (checked by the caller)
    theta = np.linspace(0.0, 180.0, geometry.n_views, endpoint=False)
    line_integrals = _line_integrals(
        mu, theta, geometry.circle, geometry.spacing, geometry.projection_downsample
    )
    photons = photons_per_bin(geometry.photons, geometry.spacing, geometry.n_views, geometry.slice_thickness)
    if geometry.modulation:
        photons = photons * modulation_weights(line_integrals)[None, :]
    sigma = np.sqrt(added_postlog_variance(line_integrals, geometry.dose, photons, geometry.electronic_noise))
    noise = sigma * rng.standard_normal(sigma.shape)
    delta_mu = (
        iradon(noise, theta=theta, output_size=size, filter_name=geometry.filter_name, circle=geometry.circle)
        / geometry.spacing
    )
    return (1000.0 / geometry.mu_water) * delta_mu[crop]


def _slice_worker(slice_hu: np.ndarray, geometry: _Geometry, seed: int, index: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    return index, _noise_hu(slice_hu, geometry, rng)


def simulate_noise_slice(
    slice_hu: np.ndarray,
    dose: float = 0.25,
    photons: float = DEFAULT_PHOTONS,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    n_views: int = DEFAULT_N_VIEWS,
    spacing: float = 0.7,
    seed: int = 0,
    slice_index: int = 0,
    slice_thickness: float = REFERENCE_THICKNESS,
    mu_water: float = MU_WATER_PER_MM,
    filter_name: str = "ramp",
    padding_hu: float = FOV_PADDING_THRESHOLD_HU,
    modulation: bool = True,
    projection_downsample: int | None = None,
) -> np.ndarray:
    """The noise image (HU, float64) that dose fraction ``dose`` adds to one normal-dose slice.

    Same model, seeding and field-of-view rule as :func:`simulate_low_dose` (whose slice ``slice_index``
    gets exactly this noise); padding pixels are not masked here.

    Args:
        slice_hu: 2D slice in HU.
        dose: dose fraction in (0, 1].
        photons: full-dose photon count (see :func:`simulate_low_dose`).
        electronic_noise: electronic noise std (counts).
        n_views: projection angles over 180 degrees.
        spacing: in-plane pixel size (mm).
        seed: base seed.
        slice_index: index of the slice in its volume (second element of the seed).
        slice_thickness: slice thickness (mm).
        mu_water: attenuation of water (1/mm).
        filter_name: FBP filter of ``skimage.transform.iradon``.
        padding_hu: values below this are padding (no attenuation, left unchanged by the simulation).
        modulation: share the photons between views as tube current modulation does.
        projection_downsample: grid coarsening of the projection that sets the noise variance (1: none;
            default 2 for slices of 256 pixels or more, else 1).
    """
    slice_hu = np.asarray(slice_hu)
    if slice_hu.ndim != 2:
        raise InputError(f"simulate_noise_slice needs a 2D slice, got shape {slice_hu.shape}")
    geometry = _make_geometry(
        slice_hu[..., None],
        dose,
        photons,
        electronic_noise,
        n_views,
        spacing,
        slice_thickness,
        mu_water,
        filter_name,
        padding_hu,
        modulation,
        projection_downsample,
    )
    return _slice_worker(slice_hu, geometry, seed, slice_index)[1]


def _needs_full_square(slices_hu: np.ndarray, padding_hu: float) -> bool:
    """True when a slice of the (X, Y, Z) stack has tissue outside radon's inscribed circle."""
    rows, cols = slices_hu.shape[:2]
    size = max(rows, cols)
    top, left = (size - rows) // 2, (size - cols) // 2
    outside = _outside_circle(size)[top : top + rows, left : left + cols]
    if not outside.any():
        return False
    values = slices_hu[outside]
    return bool(np.any((values > TISSUE_HU) & (values >= padding_hu)))


def _make_geometry(
    slices_hu: np.ndarray,
    dose: float,
    photons: float,
    electronic_noise: float,
    n_views: int,
    spacing: float,
    slice_thickness: float,
    mu_water: float,
    filter_name: str,
    padding_hu: float,
    modulation: bool,
    projection_downsample: int | None,
) -> _Geometry:
    if not 0.0 < dose <= 1.0:
        raise InputError(f"dose must be a fraction of the normal dose in (0, 1], got {dose}")
    if not (np.isfinite(photons) and photons > 0):
        raise InputError(f"photons must be a positive number of incident photons, got {photons}")
    if not electronic_noise >= 0:
        raise InputError(f"electronic_noise must be >= 0 (counts), got {electronic_noise}")
    if int(n_views) < 2:
        raise InputError(f"n_views must be at least 2 projection angles, got {n_views}")
    if not (np.isfinite(spacing) and spacing > 0):
        raise InputError(f"spacing must be the positive in-plane pixel size in mm, got {spacing}")
    if not (np.isfinite(slice_thickness) and slice_thickness > 0):
        raise InputError(f"slice_thickness must be a positive thickness in mm, got {slice_thickness}")
    if not mu_water > 0:
        raise InputError(f"mu_water must be a positive attenuation in 1/mm, got {mu_water}")
    if projection_downsample is None:
        projection_downsample = 2 if max(slices_hu.shape[:2]) >= 256 else 1
    if int(projection_downsample) < 1:
        raise InputError(f"projection_downsample must be an integer >= 1, got {projection_downsample}")
    if filter_name not in FILTERS:
        raise InputError(f"unknown FBP filter {filter_name!r}: use one of {', '.join(FILTERS)}")
    return _Geometry(
        dose=float(dose),
        photons=float(photons),
        electronic_noise=float(electronic_noise),
        n_views=int(n_views),
        spacing=float(spacing),
        slice_thickness=float(slice_thickness),
        mu_water=float(mu_water),
        filter_name=filter_name,
        padding_hu=float(padding_hu),
        circle=not _needs_full_square(slices_hu, padding_hu),
        modulation=bool(modulation),
        projection_downsample=int(projection_downsample),
    )


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


def _as_slice_stack(array: np.ndarray) -> np.ndarray:
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

    See the module docstring for the noise model. Axial slices run along the last axis and are simulated
    independently (in parallel processes); slice ``z`` draws its noise from
    ``numpy.random.default_rng([seed, z])``, so the result does not depend on ``workers``. ``dose=1.0``
    returns an unchanged copy.

    Args:
        volume_hu: HU volume, a ``MetaTensor`` (1, X, Y, Z) from ``ldct_clip.io.load_ct`` (affine and meta
            are kept), a tensor or numpy array of shape (1, X, Y, Z), (X, Y, Z) or one slice (X, Y).
        dose: dose fraction in (0, 1] relative to the input (0.25: quarter dose).
        photons: full-dose photon fluence per view on 1 mm of detector for a 3 mm slice and 1000 views
            (scaled to the pixel size, ``slice_thickness`` and ``n_views``, see the module docstring);
            :func:`calibrate_photon_count` picks it from a target noise std.
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
    stack = _as_slice_stack(array)
    if not np.all(np.isfinite(stack)):
        raise InputError("the CT volume contains NaN or infinite values: fix or mask them before simulating")
    geometry = _make_geometry(
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
            results = (_slice_worker(stack[..., z], geometry, seed, z) for z in range(n_slices))
            for z, noise in results:
                low[..., z] += noise
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(_slice_worker, stack[..., z], geometry, seed, z) for z in range(n_slices)
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
    _as_slice_stack(out)[...] = low
    return _wrap(volume_hu, out)


def _wrap(volume_hu, array: np.ndarray):
    """Return ``array`` as the input's type (MetaTensor keeps affine and meta)."""
    if isinstance(volume_hu, torch.Tensor):
        result = volume_hu.detach().clone()
        result.data = torch.from_numpy(array).to(volume_hu.device)
        return result
    return array


def measure_noise_std(
    image,
    centre: tuple[float, float] | None = None,
    radius: float | None = None,
) -> float:
    """Noise std in a flat circular ROI, pooled over slices (each slice's ROI mean removed).

    Meant for a noise image (low dose - normal dose) or a flat region such as water or liver.

    Args:
        image: 2D slice (X, Y) or stack (X, Y, Z) / (1, X, Y, Z).
        centre: ROI centre (row, column) in pixels; default the slice centre.
        radius: ROI radius in pixels; default an eighth of the smaller side.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    stack = _as_slice_stack(array).astype(np.float64)
    rows, cols = stack.shape[:2]
    if centre is None:
        centre = ((rows - 1) / 2.0, (cols - 1) / 2.0)
    if radius is None:
        radius = min(rows, cols) / 8.0
    yy, xx = np.mgrid[:rows, :cols]
    roi = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    count = int(roi.sum())
    if count < 2:
        raise InputError(f"the noise ROI (radius {radius:g} px) holds fewer than 2 pixels: make it larger")
    values = stack[roi]  # (pixels, slices)
    residual = values - values.mean(axis=0, keepdims=True)
    dof = residual.size - residual.shape[1]
    return float(np.sqrt(np.sum(residual**2) / dof))


def calibrate_photon_count(
    target_noise_std_hu: float,
    dose: float = 0.25,
    size: int = 512,
    spacing: float = 0.7,
    diameter_mm: float = 300.0,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    n_views: int = DEFAULT_N_VIEWS,
    slice_thickness: float = REFERENCE_THICKNESS,
    mu_water: float = MU_WATER_PER_MM,
    filter_name: str = "ramp",
    roi_radius_mm: float | None = None,
    slices: int | None = None,
    seed: int = 0,
    rtol: float = 0.01,
    max_iter: int = 10,
) -> float:
    """Incident photon count giving ``target_noise_std_hu`` of *added* noise in a water cylinder.

    The added noise std is measured in a central ROI of a water cylinder
    (``ldct_clip.data.phantom.make_water_cylinder``) after :func:`simulate_noise_slice`. Without electronic noise the std scales exactly as
    ``1 / sqrt(photons)``, so ``photons <- photons * (std / target)^2`` is exact in one step; with it, the
    same update is repeated (same seed, so the std is a smooth function of ``photons``) until the std is
    within ``rtol`` of the target.

    Args:
        target_noise_std_hu: noise std (HU) that dose fraction ``dose`` should add in the ROI.
        dose: dose fraction in (0, 1).
        size: pixels per side of the calibration slice.
        spacing: pixel size (mm).
        diameter_mm: water cylinder diameter (mm).
        electronic_noise: electronic noise std (counts).
        n_views: projection angles.
        slice_thickness: slice thickness (mm).
        mu_water: attenuation of water (1/mm).
        filter_name: FBP filter.
        roi_radius_mm: ROI radius (mm); default a third of the cylinder radius (where a cylinder's noise
            is nearly uniform).
        slices: independent noise realisations pooled; default enough for about 8000 ROI pixels (a 1%
            standard error on the std), i.e. 1 slice of 512 x 512 at 0.7 mm, more for small test images.
        seed: base seed.
        rtol: relative tolerance on the std.
        max_iter: iteration limit.

    Returns:
        ``photons`` for :func:`simulate_low_dose`.
    """
    if not target_noise_std_hu > 0:
        raise InputError(f"the target noise std must be positive (HU), got {target_noise_std_hu}")
    if not 0.0 < dose < 1.0:
        raise InputError(f"calibration needs a dose fraction in (0, 1), got {dose}")
    if diameter_mm > 0.98 * size * spacing:  # inside the inscribed circle, a little air around it
        raise InputError(
            f"a {diameter_mm:g} mm water cylinder does not fit {size} pixels of {spacing:g} mm: "
            "lower diameter_mm or raise size"
        )
    phantom = make_water_cylinder(size, 1, diameter_mm, (spacing, spacing, slice_thickness))[
        0, :, :, 0
    ].numpy()
    radius_px = (roi_radius_mm if roi_radius_mm is not None else diameter_mm / 6.0) / spacing
    if slices is None:
        slices = int(np.clip(np.ceil(ROI_PIXELS / (np.pi * radius_px**2)), 1, 64))

    def added_std(photons: float) -> float:
        noise = np.stack(
            [
                simulate_noise_slice(
                    phantom,
                    dose,
                    photons,
                    electronic_noise,
                    n_views,
                    spacing,
                    seed,
                    z,
                    slice_thickness,
                    mu_water,
                    filter_name,
                )
                for z in range(slices)
            ],
            axis=-1,
        )
        return measure_noise_std(noise, radius=radius_px)

    photons = DEFAULT_PHOTONS
    for _ in range(max_iter):
        std = added_std(photons)
        if abs(std / target_noise_std_hu - 1.0) <= rtol:
            return photons
        photons *= (std / target_noise_std_hu) ** 2
    raise InputError(
        f"no photon count reaches {target_noise_std_hu:g} HU within {rtol:.0%} in {max_iter} steps "
        f"(last {std:.3g} HU at {photons:.4g} photons): the electronic noise may dominate; lower it or the target"
    )
