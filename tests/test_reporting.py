"""Noise measurements and figures of the evaluation reports."""

import json

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.ndimage import gaussian_filter

from ldct_clip.errors import InputError
from ldct_clip.evaluation import (
    display_pixel_spacing,
    display_slice,
    find_detail_crop,
    find_flat_roi,
    flat_roi_noise,
    noise_power_spectrum,
    plot_comparison,
    plot_nps,
    radial_average,
    roi_std,
    save_figure,
    write_json,
)


@pytest.mark.parametrize("spacing", [(0.7, 0.7), (0.5, 1.25)])
def test_nps_integral_equals_variance(spacing):
    """Parseval: the integral of the NPS over frequency is the variance of the (mean-free) noise."""
    noise = np.random.default_rng(0).normal(0.0, 25.0, (3, 48, 40))
    nps, fr, fc = noise_power_spectrum(noise, spacing)
    assert nps.shape == (48, 40)
    assert fr[1] - fr[0] == pytest.approx(1 / (48 * spacing[0]))
    assert fc[1] - fc[0] == pytest.approx(1 / (40 * spacing[1]))
    integral = nps.sum() * (fr[1] - fr[0]) * (fc[1] - fc[0])
    variance = np.mean(np.var(noise, axis=(1, 2)))
    assert integral == pytest.approx(variance, rel=1e-10)


def test_white_noise_nps_is_flat_at_sigma2_pixel_area():
    sigma, spacing = 20.0, (0.8, 0.8)
    noise = np.random.default_rng(1).normal(0.0, sigma, (64, 64, 64))
    nps, fr, fc = noise_power_spectrum(noise, spacing)
    freq, radial = radial_average(nps, fr, fc)
    expected = sigma**2 * spacing[0] * spacing[1]  # 256 HU^2 mm^2
    assert freq.max() <= 0.5 / 0.8 + 1e-9  # up to Nyquist, not into the corners
    # Beyond the DC ring (zero after the mean is removed), every ring is within 10 % of the white level.
    np.testing.assert_allclose(radial[1:], expected, rtol=0.1)
    assert radial[0] < 0.1 * expected


def test_correlated_noise_nps_falls_with_frequency():
    noise = gaussian_filter(np.random.default_rng(2).normal(0.0, 1.0, (16, 64, 64)), sigma=(0, 1.5, 1.5))
    freq, radial = radial_average(*noise_power_spectrum(noise, (1.0, 1.0)))
    low, high = radial[(freq > 0.02) & (freq < 0.1)].mean(), radial[freq > 0.35].mean()
    assert high < 0.01 * low


def test_flat_roi_is_flat_and_inside_the_body():
    rng = np.random.default_rng(3)
    image = np.full((96, 96), -1000.0)  # air: perfectly flat, but not where noise is measured
    image[8:88, 8:88] = rng.normal(40.0, 60.0, (80, 80))  # textured tissue
    image[50:70, 20:40] = 40.0 + rng.normal(0.0, 2.0, (20, 20))  # a flat organ
    rows, cols = find_flat_roi(image, 12)
    assert rows.stop - rows.start == 12 and cols.stop - cols.start == 12
    assert rows.start >= 50 and rows.stop <= 70 and cols.start >= 20 and cols.stop <= 40
    assert roi_std(image, (rows, cols)) < 3.0


def test_flat_roi_falls_back_to_whole_image_without_body():
    image = np.random.default_rng(4).normal(-1000.0, 5.0, (32, 32))
    image[20:30, 2:12] = -1000.0
    rows, cols = find_flat_roi(image, 8)
    assert rows.start >= 20 and rows.stop <= 30 and cols.start >= 2 and cols.stop <= 12
    with pytest.raises(InputError, match="16x16"):
        find_flat_roi(np.zeros((10, 10)), 16)


def test_detail_crop_finds_the_structures():
    image = np.full((96, 96), -1000.0)
    image[4:92, 4:92] = 40.0
    image[60:80, 15:35] = 300.0  # a bone: the only edges inside the body
    rows, cols = find_detail_crop(image, 32)
    assert rows.start <= 60 and rows.stop >= 80 and cols.start <= 15 and cols.stop >= 35


def test_roi_std_is_the_sample_std():
    image = np.arange(16.0).reshape(4, 4)
    assert roi_std(image, (slice(0, 2), slice(0, 2))) == pytest.approx(np.std([0, 1, 4, 5], ddof=1))


def test_flat_roi_noise_measures_every_image_on_the_reference_roi():
    rng = np.random.default_rng(6)
    reference = np.full((64, 64), 40.0)
    reference[:, :32] += rng.normal(0.0, 50.0, (64, 32))  # textured left half: the ROI goes right
    noisy = reference + rng.normal(0.0, 20.0, reference.shape)
    roi, noise = flat_roi_noise({"low dose": noisy, "normal dose": reference}, reference)
    assert roi == find_flat_roi(reference, 8) and roi[1].start >= 32
    assert noise["normal dose"] == 0.0
    assert noise["low dose"] == roi_std(noisy, roi) and 12.0 < noise["low dose"] < 28.0


def test_display_follows_radiological_convention():
    """Anterior at the top, the patient's right (RAS +x) on the viewer's left, whatever the voxel order."""
    ras = np.zeros((6, 4))  # (X, Y) slice of a RAS volume
    ras[5, 0] = 1.0  # right-most, posterior-most voxel
    shown = display_slice(ras, np.diag([0.7, 0.9, 3.0, 1.0]))
    assert shown.shape == (4, 6)
    assert shown[-1, 0] == 1.0  # bottom (posterior), left (patient's right)
    # The same anatomy stored LPS-like (x and y reversed) displays the same.
    lps = ras[::-1, ::-1]
    np.testing.assert_array_equal(display_slice(lps, np.diag([-0.7, -0.9, 3.0, 1.0])), shown)
    # ... and stored with the in-plane axes swapped.
    swapped = np.array([[0, 0.7, 0, 0], [0.9, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(display_slice(ras.T, swapped), shown)
    assert display_pixel_spacing(np.diag([0.7, 0.9, 3.0, 1.0])) == pytest.approx((0.9, 0.7))
    assert display_pixel_spacing(swapped) == pytest.approx((0.9, 0.7))
    assert display_pixel_spacing(None) is None


def test_nps_plot_and_json(tmp_path):
    freq = np.linspace(0, 0.6, 10)
    path = save_figure(
        plot_nps({"low dose": (freq, 100 + freq), "tv": (freq, 10 + freq)}), tmp_path / "nps.png"
    )
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 400 and image.std() > 0.01
    write_json({"a": float("nan"), "b": np.float32(1.5), "c": np.arange(2)}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": 1.5, "c": [0, 1]}


def test_nps_axis_range_comes_from_the_data():
    """The zero-frequency ring is ~0 once the mean is removed (1e-28 here): it must not set the log axis."""
    freq = np.linspace(0, 0.6, 13)
    low_dose = np.r_[1e-28, 400 - 300 * freq[1:]]
    denoised = np.r_[1e-30, 40 - 30 * freq[1:]]
    figure = plot_nps({"low dose": (freq, low_dose), "denoised": (freq, denoised)})
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    bottom, top = ax.get_ylim()
    assert denoised[-1] / 2 < bottom <= denoised[-1] and low_dose[1] <= top < 2 * low_dose[1]
    assert all(line.get_xdata().min() > 0 for line in ax.get_lines())  # zero frequency left out
    # a curve near zero somewhere (a perfect denoiser) cannot stretch the axis beyond 5 decades either
    figure = plot_nps({"low dose": (freq, low_dose), "perfect": (freq, np.r_[0.0, np.full(12, 1e-20)])})
    bottom, top = figure.axes[0].get_ylim()
    assert top / bottom < 1e6


def test_comparison_is_one_figure_of_slices_zoom_and_differences(tmp_path):
    rng = np.random.default_rng(7)
    normal = np.full((48, 64), -1000.0)
    normal[8:40, 8:56] = 40.0
    images = {"normal dose": normal, "low dose": normal + rng.normal(0, 30, normal.shape), "denoised": normal}
    crop, flat = (slice(10, 26), slice(10, 26)), (slice(20, 28), slice(30, 38))
    figure = plot_comparison(images, "normal dose", "abdomen", crop=crop, flat_roi=flat, title="t")
    assert isinstance(figure, Figure) and len(figure.subfigs) == 2
    top, bottom = figure.subfigs
    assert [ax.get_title() for ax in top.axes[:3]] == ["normal dose", "low dose", "denoised"]
    assert [ax.get_title() for ax in bottom.axes[:2]] == ["low dose - normal dose", "denoised - normal dose"]
    assert top.axes[0].images[0].get_clim() == (-160.0, 240.0)  # the named abdomen window
    np.testing.assert_array_equal(top.axes[3].images[0].get_array(), normal[crop])
    image = matplotlib.image.imread(save_figure(figure, tmp_path / "comparison.png"))
    assert image.shape[0] > 600 and image.shape[1] > 600 and image[..., :3].std() > 0.05
