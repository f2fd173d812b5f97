"""Classical baselines: they denoise from the low-dose slice alone, by their documented fixed rules."""

import sys
import types

import numpy as np
import pytest

from ldct_clip.baselines import (
    NLMDenoiser,
    TVDenoiser,
    estimate_noise_sigma,
    get_baseline,
)
from ldct_clip.conventions import AIR_HU
from ldct_clip.errors import InputError


def disk_phantom(size: int = 96) -> np.ndarray:
    """Water disk (0 HU) in air with a bone (+400 HU) and a fat (-100 HU) insert; HU."""
    yy, xx = np.mgrid[:size, :size] / size
    image = np.full((size, size), AIR_HU)
    image[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.42**2] = 0.0
    image[(yy - 0.35) ** 2 + (xx - 0.6) ** 2 < 0.08**2] = 400.0
    image[(yy - 0.65) ** 2 + (xx - 0.4) ** 2 < 0.07**2] = -100.0
    return image


@pytest.fixture
def noisy_pair():
    clean = disk_phantom()
    noisy = clean + np.random.default_rng(1).normal(0.0, 40.0, clean.shape)
    return clean, noisy


# A 16x16 region of plain water in the disk phantom (rows 60-76, cols 60-76 of 96).
FLAT = (slice(60, 76), slice(60, 76))


@pytest.mark.parametrize("name", ["nlm", "tv"])
def test_baseline_reduces_noise_on_phantom(name, noisy_pair):
    clean, noisy = noisy_pair
    denoised = get_baseline(name)(noisy)
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    noise_before = np.std(noisy[FLAT] - clean[FLAT])
    noise_after = np.std(denoised[FLAT] - clean[FLAT])
    assert noise_before == pytest.approx(40.0, rel=0.15)
    assert noise_after < 0.4 * noise_before
    rmse_before = np.sqrt(np.mean((noisy - clean) ** 2))
    rmse_after = np.sqrt(np.mean((denoised - clean) ** 2))
    assert rmse_after < 0.6 * rmse_before
    # The inserts keep their contrast (within a tenth of it).
    assert np.median(denoised[31:36, 56:61]) == pytest.approx(400.0, abs=40.0)


def test_parameters_follow_the_estimated_noise_by_fixed_rules(noisy_pair):
    clean, noisy = noisy_pair
    nlm, tv = NLMDenoiser(), TVDenoiser()
    for strength in (20.0, 60.0):
        image = clean + np.random.default_rng(2).normal(0.0, strength, clean.shape)
        nlm(image)
        tv(image)
        sigma = nlm.last_parameters["sigma_hu"]
        # Estimated from the noisy slice alone: close to the truth for white noise (edges add a little).
        assert sigma == pytest.approx(strength, rel=0.2)
        assert nlm.last_parameters["h_hu"] == pytest.approx(0.8 * sigma)
        assert tv.last_parameters["sigma_hu"] == pytest.approx(sigma)
        assert tv.last_parameters["weight_hu"] == pytest.approx(0.75 * sigma)


@pytest.mark.parametrize("estimator", ["flat", "wavelet"])
def test_noise_estimate_ignores_clipped_air(estimator):
    """Air clipped at -1024 HU (as many scanners store it) must not drag the estimate down."""
    size = 128
    image = np.full((size, size), AIR_HU)
    image[40:88, 40:88] = 0.0
    noisy = image + np.random.default_rng(3).normal(0.0, 30.0, image.shape)
    noisy = np.maximum(noisy, AIR_HU)
    x = (noisy + 1024) / 4096
    body = estimate_noise_sigma(x, estimator, body_threshold=(-500 + 1024) / 4096) * 4096
    whole = estimate_noise_sigma(x, estimator) * 4096
    assert body == pytest.approx(30.0, rel=0.12)
    assert whole < 0.8 * body


def test_flat_estimator_measures_correlated_noise():
    """FBP-like correlated noise: the flat-window estimate is the pixel std, the wavelet one reads far lower."""
    clean = disk_phantom(128)
    # Filtered back-projection noise: NPS ~ |f| (ramp) with a smooth roll-off (apodised reconstruction).
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128)))
    white = np.random.default_rng(4).normal(0.0, 1.0, clean.shape)
    noise = np.real(np.fft.ifft2(np.fft.fft2(white) * np.sqrt(freq) * np.exp(-((freq / 0.3) ** 2))))
    noise *= 30.0 / noise.std()
    x = (clean + noise + 1024) / 4096
    threshold = (-500 + 1024) / 4096
    assert estimate_noise_sigma(x, "flat", threshold) * 4096 == pytest.approx(30.0, rel=0.1)
    assert estimate_noise_sigma(x, "wavelet", threshold) * 4096 < 0.5 * 30.0
    with pytest.raises(InputError, match="unknown noise estimator"):
        get_baseline("nlm", noise_estimator="mad")


def test_padding_is_restored_and_does_not_leak(noisy_pair):
    _, noisy = noisy_pair
    padded = noisy.copy()
    padded[:, :10] = -3024.0
    out = get_baseline("tv")(padded)
    np.testing.assert_array_equal(out[:, :10], -3024.0)
    # Next to the padding the air stays air-like instead of being pulled towards -3024.
    assert np.all(out[:, 10:14] > -1200.0)


def test_input_is_not_modified(noisy_pair):
    _, noisy = noisy_pair
    before = noisy.copy()
    get_baseline("nlm")(noisy)
    np.testing.assert_array_equal(noisy, before)


def test_bad_input_and_unknown_method():
    with pytest.raises(InputError, match="2-D slice"):
        get_baseline("tv")(np.zeros((4, 8, 8)))
    bad = np.zeros((16, 16))
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        get_baseline("nlm")(bad)
    with pytest.raises(InputError, match="unknown baseline 'wiener'"):
        get_baseline("wiener")


def test_bm3d_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # makes `import bm3d` raise ImportError
    with pytest.raises(InputError) as error:
        get_baseline("bm3d")
    message = str(error.value)
    assert "pip install bm3d" in message and "non-commercial" in message and "\n" not in message


def test_bm3d_gets_the_estimated_sigma(monkeypatch, noisy_pair):
    calls = {}

    def fake_bm3d(x, sigma_psd):
        calls["sigma_psd"] = sigma_psd
        return np.full_like(x, x.mean())

    monkeypatch.setitem(sys.modules, "bm3d", types.SimpleNamespace(bm3d=fake_bm3d))
    _, noisy = noisy_pair
    denoiser = get_baseline("bm3d")
    out = denoiser(noisy)
    assert calls["sigma_psd"] * 4096 == pytest.approx(denoiser.last_parameters["sigma_hu"])
    assert calls["sigma_psd"] * 4096 == pytest.approx(40.0, rel=0.2)
    assert out.shape == noisy.shape
