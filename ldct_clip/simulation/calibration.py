"""Noise measurement and photon count calibration: :func:`measure_noise_std` in a flat ROI, and
:func:`calibrate_photon_count`, the photon count that adds a target noise std in a water cylinder (how
``ldct_clip.simulation.physics.DEFAULT_PHOTONS`` was chosen).
"""

from __future__ import annotations

import numpy as np
import torch

from ldct_clip.data.phantom import make_water_cylinder
from ldct_clip.errors import InputError
from ldct_clip.simulation.physics import (
    DEFAULT_ELECTRONIC_NOISE,
    DEFAULT_N_VIEWS,
    DEFAULT_PHOTONS,
    MU_WATER_PER_MM,
    REFERENCE_THICKNESS,
)
from ldct_clip.simulation.projection import simulate_noise_slice
from ldct_clip.simulation.volume import as_slice_stack

__all__ = ["calibrate_photon_count", "measure_noise_std"]

ROI_PIXELS = 8000  # pooled ROI pixels of a calibration: std known to ~1 %


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
    stack = as_slice_stack(array).astype(np.float64)
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
    (``ldct_clip.data.phantom.make_water_cylinder``) after :func:`simulate_noise_slice`. Without electronic
    noise the std scales exactly as ``1 / sqrt(photons)``, so ``photons <- photons * (std / target)^2`` is
    exact in one step; with it, the same update is repeated (same seed, so the std is a smooth function of
    ``photons``) until the std is within ``rtol`` of the target.

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
        ``photons`` for ``ldct_clip.simulation.simulate_low_dose``.
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
