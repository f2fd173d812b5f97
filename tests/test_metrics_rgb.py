"""The reference RGB protocol: padding, x255 with or without rounding, PSNR over all channels, MATLAB SSIM."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_clip.errors import InputError
from ldct_clip.evaluation import psnr_255, rgb_metrics, ssim_matlab, to_255
from ldct_clip.networks import pad_to_multiple


def _pair():
    clean = data.chelsea()[:70, :90].astype(np.float64).transpose(2, 0, 1)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255)
    return clean, noisy


def test_ssim_equals_scikit_image_matlab_mode():
    clean, noisy = _pair()
    # scikit-image with these options is Wang et al.'s MATLAB SSIM: 11x11 Gaussian (truncate 3.5 -> radius 5),
    # population covariance, and the mean over the region 5 pixels inside the border, i.e. exactly the
    # valid region where the window fits, as the reference crops [5:-5, 5:-5]. Same numbers, not just close.
    expected = structural_similarity(
        clean,
        noisy,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=0,
    )
    assert ssim_matlab(clean, noisy) == pytest.approx(expected, abs=1e-10)
    # per-channel mean, and grey input
    per_channel = [ssim_matlab(c, n) for c, n in zip(clean, noisy)]
    assert ssim_matlab(clean, noisy) == pytest.approx(np.mean(per_channel), abs=1e-12)
    assert ssim_matlab(clean, clean) == pytest.approx(1.0)
    # the valid-region choice matters: a uniform 7x7 window (skimage default) gives another number
    other = structural_similarity(clean, noisy, data_range=255, channel_axis=0)
    assert abs(other - expected) > 1e-3
    with pytest.raises(InputError, match="at least 11x11"):
        ssim_matlab(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))


def test_psnr_over_all_channels_range_255():
    clean, noisy = _pair()
    mse = np.mean((clean - noisy) ** 2)
    assert psnr_255(clean, noisy) == pytest.approx(20 * math.log10(255 / math.sqrt(mse)), abs=1e-12)
    assert psnr_255(clean, noisy) == pytest.approx(
        peak_signal_noise_ratio(clean, noisy, data_range=255), abs=1e-10
    )
    assert psnr_255(clean, clean) == math.inf


def test_protocols_clamp_scale_and_round():
    clean = torch.from_numpy(data.astronaut()[:48, :48].astype(np.float32).transpose(2, 0, 1) / 255)
    offset = clean + 0.4 / 255  # below half a grey level
    synthetic = rgb_metrics(clean, offset, "synthetic")
    assert synthetic["psnr"] == pytest.approx(20 * math.log10(255 / 0.4), abs=0.05)  # clean=1 clamps a little
    assert rgb_metrics(clean, offset, "srgb")["psnr"] == math.inf  # rounding to uint8 removes the offset
    assert rgb_metrics(clean, clean + 2.0, "synthetic")["psnr"] == pytest.approx(
        psnr_255(to_255(clean, False), np.full(clean.shape, 255.0))
    )  # the output is clamped to [0, 1] first
    assert to_255(torch.tensor([2.4 / 255, 2.6 / 255, 1.2]), rounding=True).tolist() == [2.0, 3.0, 255.0]
    with pytest.raises(InputError, match="unknown metric protocol"):
        rgb_metrics(clean, clean, "ct")


def test_pad_to_multiple_of_32_reflect_and_crop_back():
    """The one ``pad_to_multiple`` (``ldct_clip.networks``) pads as the reference's evaluation does."""
    x = torch.arange(2 * 3 * 50 * 70, dtype=torch.float32).reshape(2, 3, 50, 70)
    padded = pad_to_multiple(x, 32)
    assert padded.shape == (2, 3, 64, 96)
    # reflect at the bottom/right edge, the edge row not repeated (the reference's F.pad(..., 'reflect'))
    assert torch.equal(padded[:, :, 50, :70], x[:, :, 48]) and torch.equal(
        padded[:, :, :50, 70], x[:, :, :, 68]
    )
    assert torch.equal(padded[..., :50, :70], x)
    assert pad_to_multiple(x[:, :, :32, :64], 32).shape == (2, 3, 32, 64)
    assert pad_to_multiple(x[0], 32).shape == (3, 64, 96)
    # a tiny image is reflected again and again, as numpy's "reflect" does (the other copy replicated here)
    tiny = torch.arange(6.0).reshape(1, 1, 2, 3)
    expected = np.pad(tiny[0, 0].numpy(), ((0, 2), (0, 1)), mode="reflect")
    np.testing.assert_array_equal(pad_to_multiple(tiny, 4)[0, 0].numpy(), expected)


def test_ssim_on_blurred_image_is_sensible():
    clean, _ = _pair()
    blurred = uniform_filter(clean, size=(1, 5, 5))
    value = ssim_matlab(clean, blurred)
    assert 0.3 < value < 0.95
