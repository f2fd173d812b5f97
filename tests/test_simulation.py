"""Projection-domain low-dose simulation: noise level, dose scaling, bias, seeding, padding, types."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.transform import radon

from ldct_clip.data.phantom import make_phantom, make_water_cylinder
from ldct_clip.errors import InputError
from ldct_clip.simulation import (
    added_postlog_variance,
    calibrate_photon_count,
    hu_to_mu,
    measure_noise_std,
    modulation_weights,
    simulate_low_dose,
)

SIZE = 64
SPACING = 5.0  # 320 mm field of view: a 300 mm water cylinder fits the inscribed circle
VIEWS = 96
ROI = 10.0  # px: 50 mm, the calibration's default ROI for a 300 mm cylinder


def water_volume(slices: int = 8) -> np.ndarray:
    return make_water_cylinder(SIZE, slices, 300.0, (SPACING, SPACING, 3.0))[0].numpy()


def added_noise(dose: float, photons: float, seed: int = 0, **kwargs) -> np.ndarray:
    volume = water_volume()
    low = simulate_low_dose(
        volume, dose, photons, n_views=VIEWS, spacing=SPACING, seed=seed, workers=1, progress=False, **kwargs
    )
    return low.astype(np.float64) - volume


@pytest.fixture(scope="module")
def photons_20hu() -> float:
    return calibrate_photon_count(20.0, dose=0.25, size=SIZE, spacing=SPACING, n_views=VIEWS)


def test_calibration_target_met_within_10_percent(photons_20hu):
    # a fresh realisation (other seed, other slices) of the calibrated dose lands on the target
    std = measure_noise_std(added_noise(0.25, photons_20hu, seed=7), radius=ROI)
    assert std == pytest.approx(20.0, rel=0.10)


def test_calibration_follows_photon_statistics():
    # without electronic noise std ~ 1/sqrt(photons): half the noise takes four times the photons
    kwargs = {"dose": 0.25, "size": SIZE, "spacing": SPACING, "n_views": VIEWS, "electronic_noise": 0.0}
    assert calibrate_photon_count(10.0, **kwargs) / calibrate_photon_count(20.0, **kwargs) == pytest.approx(
        4.0, rel=0.03
    )


def test_noise_free_path_returns_input_unchanged():
    volume = water_volume(2) + np.float32(3.5)
    same = simulate_low_dose(volume, dose=1.0, spacing=SPACING, progress=False)
    assert same is not volume and same.dtype == volume.dtype
    np.testing.assert_array_equal(same, volume)
    meta = MetaTensor(
        torch.from_numpy(volume[None]), affine=torch.diag(torch.tensor([SPACING, SPACING, 3.0, 1.0]))
    )
    same = simulate_low_dose(meta, dose=1.0, progress=False)
    assert torch.equal(same.as_tensor(), meta.as_tensor())


def test_noise_std_follows_dose_fraction(photons_20hu):
    # photon noise alone: added variance ~ (1 - d) / d, i.e. 9, 3 and 1 at d = 0.1, 0.25, 0.5
    std = {
        dose: measure_noise_std(added_noise(dose, photons_20hu, seed=seed, electronic_noise=0.0), radius=ROI)
        for seed, dose in enumerate((0.1, 0.25, 0.5))
    }
    assert std[0.25] / std[0.5] == pytest.approx(np.sqrt(3.0), rel=0.10)
    assert std[0.1] / std[0.5] == pytest.approx(3.0, rel=0.10)
    # electronic noise weighs more as the counts drop: (1 - d^2) sigma_e^2 / (d N)^2 on top
    with_electronic = measure_noise_std(
        added_noise(0.1, photons_20hu, seed=0, electronic_noise=50.0), radius=ROI
    )
    assert with_electronic > 1.2 * std[0.1]


def test_postlog_variance_matches_poisson_gaussian_counts():
    # Monte Carlo of the measurement: Poisson photons plus Gaussian electronic noise, then -log(count / I0)
    rng = np.random.default_rng(0)
    photons, sigma_e, dose, n = 2.0e5, 30.0, 0.25, 400_000
    for p in (0.5, 3.0, 5.0):
        full = rng.poisson(photons * np.exp(-p), n) + sigma_e * rng.standard_normal(n)
        low = rng.poisson(dose * photons * np.exp(-p), n) + sigma_e * rng.standard_normal(n)
        measured = np.var(-np.log(low / (dose * photons))) - np.var(-np.log(full / photons))
        assert added_postlog_variance(p, dose, photons, sigma_e) == pytest.approx(measured, rel=0.05)
    assert added_postlog_variance(3.0, 1.0, photons, sigma_e) == 0.0


def test_mean_hu_is_unbiased(photons_20hu):
    noise = added_noise(0.25, photons_20hu / 4.0, seed=4)  # 40 HU of noise
    yy, xx = np.mgrid[:SIZE, :SIZE]
    water = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 20**2  # 100 mm inside the 150 mm radius
    assert measure_noise_std(noise, radius=ROI) > 30.0
    assert abs(noise[water].mean()) < 2.0


def test_seeded_and_independent_of_workers(photons_20hu):
    volume = water_volume(4)
    kwargs = {"photons": photons_20hu, "n_views": VIEWS, "spacing": SPACING, "progress": False}
    serial = simulate_low_dose(volume, seed=3, workers=1, **kwargs)
    parallel = simulate_low_dose(volume, seed=3, workers=2, **kwargs)
    np.testing.assert_array_equal(serial, parallel)
    other = simulate_low_dose(volume, seed=4, workers=1, **kwargs)
    assert np.abs(other - serial).max() > 1.0
    # slices differ from each other although the input slices are identical
    assert np.abs(serial[..., 0] - serial[..., 1]).max() > 1.0


def test_padding_and_fov_preserved(photons_20hu):
    phantom = make_phantom(SIZE, 2, (SPACING, SPACING, 3.0), fov_padding=True)
    low = simulate_low_dose(phantom, photons=photons_20hu, n_views=VIEWS, progress=False)
    volume, low = phantom[0].numpy(), low[0].numpy()
    padding = volume < -2000
    assert padding.sum() > 500
    np.testing.assert_array_equal(low[padding], volume[padding])
    changed = np.abs(low - volume) > 0
    yy, xx = np.mgrid[:SIZE, :SIZE] - 31.5
    fov = np.repeat((yy**2 + xx**2 < 30**2)[..., None], 2, axis=-1)
    assert changed[fov].mean() > 0.99  # body and air inside the field of view get noise


def test_tissue_outside_inscribed_circle_gets_noise(photons_20hu):
    # a slice filled with water to the corners needs the padded (circle=False) projection
    volume = np.zeros((SIZE, SIZE - 8, 2), dtype=np.float32)  # non-square as well
    low = simulate_low_dose(volume, photons=photons_20hu, n_views=VIEWS, spacing=SPACING, progress=False)
    assert low.shape == volume.shape
    corner = low[:6, :6] - volume[:6, :6]
    assert np.abs(corner).mean() > 5.0


def test_metatensor_keeps_type_affine_meta_dtype(photons_20hu):
    affine = torch.tensor(
        [[-SPACING, 0, 0, 10.0], [0, -SPACING, 0, 20.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    volume = MetaTensor(torch.from_numpy(water_volume(2)[None]), affine=affine, meta={"source_kind": "nifti"})
    low = simulate_low_dose(
        volume, photons=photons_20hu, n_views=VIEWS, progress=False
    )  # spacing from affine
    assert isinstance(low, MetaTensor) and low.shape == volume.shape and low.dtype == torch.float32
    assert torch.equal(low.affine, volume.affine) and low.meta["source_kind"] == "nifti"
    expected = simulate_low_dose(
        water_volume(2), photons=photons_20hu, n_views=VIEWS, spacing=SPACING, workers=1, progress=False
    )
    np.testing.assert_array_equal(low[0].numpy(), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dose": 0.0, "spacing": 1.0}, "dose"),
        ({"dose": 1.5, "spacing": 1.0}, "dose"),
        ({"dose": 0.25}, "spacing"),
        ({"dose": 0.25, "spacing": (0.7, 1.4)}, "square"),
        ({"dose": 0.25, "spacing": 1.0, "photons": -1.0}, "photons"),
        ({"dose": 0.25, "spacing": 1.0, "filter_name": "lanczos"}, "filter"),
    ],
)
def test_bad_arguments_raise_one_line_input_error(kwargs, message):
    with pytest.raises(InputError, match=message) as error:
        simulate_low_dose(np.zeros((16, 16, 2), np.float32), progress=False, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_volume_raises_input_error():
    with pytest.raises(InputError, match="shape"):
        simulate_low_dose(np.zeros((2, 8, 8, 2), np.float32), spacing=1.0, progress=False)
    nan = np.zeros((8, 8, 1), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        simulate_low_dose(nan, spacing=1.0, progress=False)


def test_tube_current_modulation_lowers_noise_at_equal_dose():
    # a 340 x 220 mm water ellipse: lateral views attenuate more and get more photons
    yy, xx = (np.mgrid[:SIZE, :SIZE] - 31.5) * SPACING
    ellipse = np.where((xx / 170) ** 2 + (yy / 110) ** 2 <= 1, 0.0, -1000.0).astype(np.float32)
    volume = np.repeat(ellipse[..., None], 4, axis=-1)
    kwargs = {"photons": 1e5, "n_views": VIEWS, "spacing": SPACING, "workers": 1, "progress": False}
    body = np.repeat((ellipse == 0)[..., None], 4, axis=-1)
    variance = {
        flag: np.mean((simulate_low_dose(volume, modulation=flag, **kwargs) - volume)[body] ** 2)
        for flag in (True, False)
    }
    assert variance[True] < 0.95 * variance[False]
    # a cylinder is not modulated: every view gets the mean photon count
    mu = hu_to_mu(water_volume(1)[..., 0])
    weights = modulation_weights(radon(mu, np.linspace(0, 180, VIEWS, endpoint=False)) * SPACING)
    assert weights.mean() == pytest.approx(1.0) and np.ptp(weights) < 0.01


def test_coarse_projection_keeps_the_noise_level():
    # the default for slices >= 256 px projects the variance-setting sinogram on a 2x coarser grid
    phantom = make_phantom(256, 1, (1.4, 1.4, 3.0))
    kwargs = {"photons": 1e5, "n_views": 128, "workers": 1, "progress": False}
    exact = simulate_low_dose(phantom, projection_downsample=1, **kwargs) - phantom
    coarse = simulate_low_dose(phantom, **kwargs) - phantom
    for centre in ((128, 128), (90, 140), (170, 110)):
        assert measure_noise_std(coarse, centre, 20) == pytest.approx(
            measure_noise_std(exact, centre, 20), rel=0.02
        )
    assert not np.array_equal(coarse.numpy(), exact.numpy())
