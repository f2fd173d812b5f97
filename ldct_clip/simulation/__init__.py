"""Projection-domain low-dose simulation: insert the extra quantum noise of a lower dose into normal-dose CT.

The normal-dose image already carries the noise of its own dose, so the simulation adds only the
*difference*: low dose = normal dose + FBP(noise). Anatomy, resolution and the values outside the field of
view stay as they are. Per axial slice:

1. HU -> linear attenuation (``physics``);
2. parallel-beam forward projection to line integrals, by default on a 2x coarser grid (``projection``);
3. post-log Gaussian noise with the variance a dose fraction ``d`` adds (Yu et al. 2012; ``physics``);
4. tube current modulation sharing the photons between the views (``physics``);
5. filtered back-projection of the noise alone, back to HU (``projection``).

Each slice draws its noise from ``numpy.random.default_rng([seed, slice_index])``, so the result does not
depend on the number of worker processes.

Modules:
    ``physics``: attenuation, post-log noise variance, photon count convention, modulation, constants.
    ``projection``: field of view geometry, line integrals, the noise of one slice (``simulate_noise_slice``).
    ``volume``: ``simulate_low_dose`` over a volume (process pool), spacing and ``slice_thickness``.
    ``calibration``: ``measure_noise_std`` and ``calibrate_photon_count``.
"""

from ldct_clip.simulation.calibration import calibrate_photon_count, measure_noise_std
from ldct_clip.simulation.physics import (
    DEFAULT_ELECTRONIC_NOISE,
    DEFAULT_N_VIEWS,
    DEFAULT_PHOTONS,
    MU_WATER_PER_MM,
    REFERENCE_THICKNESS,
    REFERENCE_VIEWS,
    added_postlog_variance,
    hu_to_mu,
    modulation_weights,
    photons_per_bin,
)
from ldct_clip.simulation.projection import simulate_noise_slice
from ldct_clip.simulation.volume import simulate_low_dose, slice_thickness

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
