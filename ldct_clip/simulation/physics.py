"""The physics of the low-dose noise model: attenuation, post-log noise variance, photon counts, modulation.

Steps 1, 3 and 4 of the per-slice model (numbered as in the ``ldct_clip.simulation`` package docstring):

1. HU -> linear attenuation ``mu = mu_water * (1 + HU / 1000)`` (1/mm, clipped at 0; padding such as -3024
   counts as air), in physical units through the pixel spacing.
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

Steps 2 and 5, projection and back-projection, are in ``ldct_clip.simulation.projection``.

Photon count convention: ``photons`` is the full-dose photon fluence per view for a detector bin of 1 mm
width and a slice of ``REFERENCE_THICKNESS`` (3 mm), in an acquisition of ``REFERENCE_VIEWS`` (1000) views
over 180 degrees. A bin is one pixel wide, so a slice of pixel size ``s`` and thickness ``t`` simulated with
``n_views`` views gets ``I0 = photons * (s / 1 mm) * (t / 3 mm) * (1000 / n_views)`` per bin and view: the
dose, and the image noise, do not depend on the angular sampling chosen, and the noise grows with smaller
pixels (std ~ s^-1.5) and thinner slices (std ~ t^-0.5) as on a scanner.

Default photon count: ``DEFAULT_PHOTONS = 6.9e6`` is what
:func:`ldct_clip.simulation.calibration.calibrate_photon_count` returns (6.7e6 to 6.9e6 over seeds) for an
added noise std of 20 HU at quarter dose in the centre (50 mm ROI) of a 300 mm water cylinder (a typical
adult abdomen's water-equivalent diameter), 512 x 512 pixels of 0.7 mm, 3 mm slice, ``sigma_e = 10``, 720
views, ramp filter. The Mayo 2016 quarter-dose data (3 mm, B30) have about 10-12 HU of noise in the liver at
full dose and 20-25 HU at quarter dose, i.e. ``sqrt(1/d - 1) * 11 ~ 19`` HU added. It is an effective count
for this 2D parallel-beam model (it stands for a whole slab of detector rows), not a scanner's photons per
detector element; use ``calibrate_photon_count`` to match another scanner.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ldct_clip.conventions import (
    DEFAULT_ELECTRONIC_NOISE,
    DEFAULT_N_VIEWS,
    DEFAULT_PHOTONS,
    FOV_PADDING_THRESHOLD_HU,
)

__all__ = [
    "DEFAULT_ELECTRONIC_NOISE",
    "DEFAULT_N_VIEWS",
    "DEFAULT_PHOTONS",
    "MU_WATER_PER_MM",
    "REFERENCE_THICKNESS",
    "REFERENCE_VIEWS",
    "added_postlog_variance",
    "hu_to_mu",
    "modulation_weights",
    "photons_per_bin",
]

MU_WATER_PER_MM = 0.0192  # water at ~70 keV effective energy (NIST XCOM: 0.193 cm^2/g)
REFERENCE_VIEWS = 1000
REFERENCE_THICKNESS = 3.0


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
