"""Synthetic noise: the reference protocol bit for bit, each noise's statistics, seeding, suites."""

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import convolve
from skimage import data

from ldct_clip.errors import InputError
from ldct_clip.transforms.noise import (
    NOISE_SUITES,
    GaussianNoise,
    GaussianNoised,
    MixtureNoise,
    PoissonNoise,
    PoissonNoised,
    SaltPepperNoise,
    SpatialGaussianNoise,
    SpatialGaussianNoised,
    SpeckleNoise,
    load_noise_suites,
    make_noise,
)


def _astronaut_hwc() -> np.ndarray:
    return (
        data.astronaut()[100:164, 200:280].astype(np.float32) / 255.0
    )  # (64, 80, 3) float32 like the reference


def _chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def _reference_noisy(hwc: np.ndarray, noise_type: str, level: float) -> np.ndarray:
    """The reference test script's steps (Denoising/test_synthetic_denoising.py, utils.add_poisson_noise),
    written out with the global legacy generator, returned as the float32 array the network gets."""
    np.random.seed(seed=0)
    if noise_type == "gauss":
        img = hwc + np.random.normal(0, level / 255.0, hwc.shape)
    elif noise_type == "spatial_gauss":
        noise = np.random.normal(0, level / 255.0, hwc.shape)
        for chn in range(hwc.shape[-1]):
            noise[..., chn] = convolve(noise[..., chn], np.ones((3, 3)) / 9.0)
        img = hwc + noise
    else:
        q = np.clip((hwc * 255.0).round(), 0, 255) / 255.0
        vals = 2 ** np.ceil(np.log2(len(np.unique(q))))
        out = np.float32(np.random.poisson(q * vals) / float(vals))
        img = np.clip(hwc + (out - q) * level, 0, 1)
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float().numpy()


@pytest.mark.parametrize(
    ("ours", "theirs", "level"),
    [
        (GaussianNoise, "gauss", 25),
        (SpatialGaussianNoise, "spatial_gauss", 50),
        (PoissonNoise, "poisson", 3.5),
    ],
)
def test_reference_protocol_bit_identical(ours, theirs, level):
    hwc = _astronaut_hwc()
    expected = _reference_noisy(hwc, theirs, level)
    got = ours(level, fixed_seed=0)(_chw(hwc)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_gaussian_std_and_unclipped():
    x = torch.full((3, 128, 128), 0.02)
    noise = (GaussianNoise(25, fixed_seed=0)(x) - x).numpy().astype(np.float64) * 255
    assert abs(noise.std() - 25) < 0.3 and abs(noise.mean()) < 0.3
    assert (x + torch.from_numpy(noise / 255)).min() < 0  # not clipped: values below 0 survive


def test_spatial_noise_std_and_neighbour_correlation():
    sigma = 45
    x = torch.full((3, 192, 192), 0.5)
    noise = (SpatialGaussianNoise(sigma, fixed_seed=1)(x) - x).numpy().astype(np.float64)[:, 2:-2, 2:-2]
    noise *= 255
    # box average of 9 iid samples: std sigma/3
    assert noise.std() == pytest.approx(sigma / 3, rel=0.02)

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    # shared cells of two 3x3 boxes: 6 of 9 for a horizontal or vertical step, 4 diagonal, 3 two apart, 0 at 3
    assert corr(noise[:, :, :-1], noise[:, :, 1:]) == pytest.approx(6 / 9, abs=0.015)
    assert corr(noise[:, :-1, :], noise[:, 1:, :]) == pytest.approx(6 / 9, abs=0.015)
    assert corr(noise[:, :-1, :-1], noise[:, 1:, 1:]) == pytest.approx(4 / 9, abs=0.015)
    assert corr(noise[:, :, :-2], noise[:, :, 2:]) == pytest.approx(3 / 9, abs=0.015)
    # zero correlations: the estimate's std is about 0.011 here (neighbouring products are correlated)
    assert abs(corr(noise[:, :, :-3], noise[:, :, 3:])) < 0.04
    assert abs(corr(noise[0], noise[1])) < 0.04  # channels independent


def test_poisson_variance_follows_bit_depth_rule_and_clips():
    # 256 distinct values (column k has value k/255) -> v = 256; noise variance q / v * scale^2
    ramp = np.tile(np.arange(256, dtype=np.float32) / 255.0, (3, 256, 1))
    scale = 2.0
    y = PoissonNoise(scale, fixed_seed=0)(ramp)
    assert y.min() >= 0 and y.max() <= 1
    noise = (y - ramp).astype(np.float64)
    columns = np.arange(77, 179)  # q in [0.3, 0.7]: more than 3 std from the clipping bounds
    measured = noise[:, :, columns].var(axis=(0, 1))
    expected = ramp[0, 0, columns] / 256 * scale**2
    assert np.mean(measured / expected) == pytest.approx(1.0, abs=0.02)
    assert abs(noise[:, :, columns].mean()) < 0.002
    # three distinct values -> v = 4: variance 0.4 / 4 * 0.1^2 for the 0.4 region
    three = np.repeat(np.array([0.2, 0.4, 0.6], np.float32), 128 * 128).reshape(3, 128, 128)
    noise3 = (PoissonNoise(0.1, fixed_seed=0)(three) - three)[1].astype(np.float64)
    assert noise3.var() == pytest.approx(0.4 / 4 * 0.01, rel=0.05)
    # dark image: clipping at 0 piles samples up at exactly 0
    dark = np.full((3, 64, 64), 0.02, np.float32)
    assert (PoissonNoise(3.5, fixed_seed=0)(dark) == 0).mean() > 0.3


def test_speckle_salt_pepper_mixture_statistics():
    x = np.full((3, 128, 128), 0.5, np.float32)
    relative = (SpeckleNoise(50, fixed_seed=0)(x) - x) / x
    assert relative.std() * 255 == pytest.approx(50, rel=0.02)
    y = SaltPepperNoise(0.1, fixed_seed=0)(x)
    assert (y == 1).mean() == pytest.approx(0.05, abs=0.004)
    assert (y == 0).mean() == pytest.approx(0.05, abs=0.004)
    assert ((y == 1) | (y == 0) | (y == x)).all()
    # mixture on a natural image (a constant image has one distinct value: v = 1, a degenerate Poisson)
    img = _chw(_astronaut_hwc()).numpy()
    m = MixtureNoise(20, poisson_scale=1.0, amount=0.02, fixed_seed=0)(img)
    assert m.min() >= 0 and m.max() <= 1
    # impulses are drawn last, so amount=0 gives the same image before them
    before = MixtureNoise(20, poisson_scale=1.0, amount=0.0, fixed_seed=0)(img)
    impulses = m != before
    assert 0.015 < impulses.mean() <= 0.021 and np.isin(m[impulses], [0.0, 1.0]).all()
    gaussian_only = (GaussianNoise(20, fixed_seed=0)(img) - img).std()
    poisson_only = (PoissonNoise(1.0, fixed_seed=0)(img) - img).std()
    assert np.hypot(gaussian_only, poisson_only) == pytest.approx((before - img).std(), rel=0.1)


def test_fixed_seed_reseeds_per_image_and_running_stream_is_reproducible():
    a, b = _chw(_astronaut_hwc()), torch.rand(3, 64, 80)
    t = GaussianNoise(15, fixed_seed=0)
    first, again = t(a), t(a)
    assert torch.equal(first, again)
    # per-image reseed: every image of the same shape gets the same noise field
    np.testing.assert_allclose((t(b) - b).numpy(), (first - a).numpy(), atol=1e-6)
    running = GaussianNoise(15)
    running.set_random_state(7)
    s1 = [running(a) for _ in range(2)]
    running.set_random_state(7)
    s2 = [running(a) for _ in range(2)]
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1]) and not torch.equal(s1[0], s1[1])


def test_dictionary_twins_and_types():
    img = MetaTensor(_chw(_astronaut_hwc()), meta={"filename_or_obj": "a.png"})
    out = GaussianNoised(keys="image", sigma=15, fixed_seed=0)({"image": img, "label": 1})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "a.png"
    assert torch.equal(out["image"].as_tensor(), GaussianNoise(15, fixed_seed=0)(img).as_tensor())
    assert out["label"] == 1
    d = SpatialGaussianNoised(keys=["a", "b"], sigma=40)
    d.set_random_state(3)
    two = d({"a": img.clone(), "b": img.clone()})
    assert not torch.equal(two["a"], two["b"])  # one running stream across keys
    arr = PoissonNoised(keys="x", scale=2, fixed_seed=0)({"x": img.numpy()})["x"]
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32


def test_suites_file_matches_library_and_bad_input(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "noise_suites.json"
    assert load_noise_suites(config) == NOISE_SUITES
    assert NOISE_SUITES["paper"] == {
        "gaussian": [15, 25, 50],
        "spatial_gaussian": [40, 45, 50, 55],
        "poisson": [2, 2.5, 3, 3.5],
    }
    for suite in NOISE_SUITES.values():
        for noise_type, levels in suite.items():
            for level in levels:
                assert make_noise(noise_type, level).fixed_seed == 0
    bad = tmp_path / "suites.json"
    bad.write_text(json.dumps({"x": {"laplace": [1]}}))
    with pytest.raises(InputError, match="unknown noise type 'laplace'"):
        load_noise_suites(bad)
    with pytest.raises(InputError, match="not found"):
        load_noise_suites(tmp_path / "missing.json")
    with pytest.raises(InputError, match="channel-first"):
        GaussianNoise(15)(np.zeros((8, 8)))
