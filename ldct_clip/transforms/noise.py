"""Synthetic image noise for training and for the out-of-distribution test protocols.

Array transforms work on channel-first images in [0, 1] (numpy, torch or MetaTensor; the output has the
input's type) and each has a dictionary twin. Noise levels use the papers' units: ``sigma`` in 1/255 (15
means a standard deviation of 15/255 on [0, 1] data).

The first three reproduce the test protocol of the reference code (``alwaysuu/CLIPDenoising``,
``Denoising/test_synthetic_denoising.py`` and ``Denoising/utils.py``), bit for bit when called with
``fixed_seed=0`` on a float32 image, because they draw from the same legacy NumPy generator in the same
order (``np.random.seed(0)`` before every image, noise of shape (H, W, C)):

- :class:`GaussianNoise`: ``x + N(0, (sigma/255)^2)``, not clipped.
- :class:`SpatialGaussianNoise`: Gaussian noise filtered per channel by a 3x3 box (``scipy.ndimage.convolve``,
  "reflect" border), not clipped. The noise std is sigma/255/3 and the correlation of horizontal or vertical
  neighbours 6/9 (diagonal 4/9, two pixels apart 3/9).
- :class:`PoissonNoise`: BasicSR's ``add_poisson_noise``: the image rounded to 8 bits, ``v = 2^ceil(log2(#unique
  values))``, noise ``(Poisson(x8 * v) / v - x8) * scale`` added to the image, result clipped to [0, 1].

The reference has no others; ours, for a wider robustness suite:

- :class:`SpeckleNoise`: multiplicative, ``x + x * N(0, (sigma/255)^2)``.
- :class:`SaltPepperNoise`: a fraction ``amount`` of the samples set to 0 or 1 (half each).
- :class:`MixtureNoise`: Poisson (``poisson_scale``), then Gaussian ``sigma``, then salt-and-pepper ``amount``,
  clipped to [0, 1].

Named suites (noise type -> levels) are in :data:`NOISE_SUITES` and ``configs/noise_suites.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type
from scipy.ndimage import convolve

from ldct_clip.errors import InputError

__all__ = [
    "GaussianNoise",
    "GaussianNoised",
    "MixtureNoise",
    "MixtureNoised",
    "NOISE_SUITES",
    "NOISE_TYPES",
    "PoissonNoise",
    "PoissonNoised",
    "SaltPepperNoise",
    "SaltPepperNoised",
    "SpatialGaussianNoise",
    "SpatialGaussianNoised",
    "SpeckleNoise",
    "SpeckleNoised",
    "load_noise_suites",
    "make_noise",
]


class _ImageNoise(Randomizable, Transform):
    """Shared mechanics: channel-first in, noise drawn in the reference's (H, W, C) order, same type out.

    Args:
        fixed_seed: when not None, the generator is reset to this seed before every call, as the reference
            test scripts do per image (``np.random.seed(0)``), so every image gets the same noise draw for its
            shape. ``None``: one running stream (``set_random_state`` seeds it).
    """

    def __init__(self, fixed_seed: int | None = None) -> None:
        self.fixed_seed = fixed_seed

    def randomize(self, data: Any = None) -> None:
        """Draws happen inside :meth:`_noisy_hwc`; nothing to precompute."""

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, img: Any) -> Any:
        array = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
        if array.ndim != 3:
            raise InputError(
                f"noise transforms expect a channel-first (C, H, W) image, got shape {array.shape}"
            )
        if self.fixed_seed is not None:
            self.set_random_state(seed=self.fixed_seed)
        # The reference loads images as float32 (H, W, C); draw in that layout so seeded draws coincide.
        hwc = np.ascontiguousarray(np.moveaxis(array.astype(np.float32, copy=False), 0, -1))
        noisy = np.ascontiguousarray(np.moveaxis(self._noisy_hwc(hwc), -1, 0)).astype(np.float32)
        return convert_to_dst_type(noisy, img, dtype=np.float32)[0]


class GaussianNoise(_ImageNoise):
    """Additive white Gaussian noise, not clipped (reference: ``img + np.random.normal(0, sigma/255., shape)``).

    Args:
        sigma: standard deviation in 1/255 units.
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(self, sigma: float, fixed_seed: int | None = None) -> None:
        super().__init__(fixed_seed)
        self.sigma = float(sigma)

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        return image + self.R.normal(0, self.sigma / 255.0, image.shape)


class SpatialGaussianNoise(_ImageNoise):
    """Spatially correlated Gaussian noise: white noise of std sigma/255 averaged per channel over a 3x3 box
    ("reflect" border, scipy's default as in the reference), not clipped. Its std is sigma/255/3.

    Args:
        sigma: standard deviation of the white noise before filtering, in 1/255 units.
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(self, sigma: float, fixed_seed: int | None = None) -> None:
        super().__init__(fixed_seed)
        self.sigma = float(sigma)

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        noise = self.R.normal(0, self.sigma / 255.0, image.shape)
        kernel = np.ones((3, 3)) / 9.0
        for channel in range(image.shape[-1]):
            noise[..., channel] = convolve(noise[..., channel], kernel)
        return image + noise


class PoissonNoise(_ImageNoise):
    """BasicSR-style Poisson noise with a scale, clipped to [0, 1].

    With ``q = round(255 x) / 255`` and ``v = 2^ceil(log2(number of distinct values of q))``:
    ``y = clip(x + (Poisson(q v) / v - q) * scale, 0, 1)``. Before clipping the noise variance is
    ``q / v * scale^2``.

    Args:
        scale: noise scale (the protocol uses 2, 2.5, 3, 3.5).
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(self, scale: float, fixed_seed: int | None = None) -> None:
        super().__init__(fixed_seed)
        self.scale = float(scale)

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        return np.clip(image + _poisson_noise(self.R, image, self.scale), 0, 1)


def _poisson_noise(rng: np.random.RandomState, image: np.ndarray, scale: float) -> np.ndarray:
    quantised = np.clip((image * 255.0).round(), 0, 255) / 255.0
    levels = 2 ** np.ceil(np.log2(len(np.unique(quantised))))
    counts = np.float32(rng.poisson(quantised * levels) / float(levels))
    return (counts - quantised) * scale


class SpeckleNoise(_ImageNoise):
    """Multiplicative Gaussian noise ``x + x * N(0, (sigma/255)^2)``, optionally clipped.

    Args:
        sigma: standard deviation of the multiplicative factor, in 1/255 units.
        clip: clip the result to [0, 1].
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(self, sigma: float, clip: bool = False, fixed_seed: int | None = None) -> None:
        super().__init__(fixed_seed)
        self.sigma = float(sigma)
        self.clip = clip

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        noisy = image + image * self.R.normal(0, self.sigma / 255.0, image.shape)
        return np.clip(noisy, 0, 1) if self.clip else noisy


class SaltPepperNoise(_ImageNoise):
    """Impulse noise: each sample (pixel and channel independently) becomes 1 ("salt") or 0 ("pepper") with
    probability ``amount``; ``salt_fraction`` of those are salt.

    Args:
        amount: fraction of samples replaced, in [0, 1].
        salt_fraction: fraction of the replaced samples set to 1.
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(self, amount: float, salt_fraction: float = 0.5, fixed_seed: int | None = None) -> None:
        super().__init__(fixed_seed)
        if not 0 <= amount <= 1 or not 0 <= salt_fraction <= 1:
            raise InputError(
                f"salt-and-pepper amount and salt_fraction must lie in [0, 1], got {amount}, {salt_fraction}"
            )
        self.amount = float(amount)
        self.salt_fraction = float(salt_fraction)

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        return _salt_pepper(self.R, image, self.amount, self.salt_fraction)


def _salt_pepper(
    rng: np.random.RandomState, image: np.ndarray, amount: float, salt_fraction: float
) -> np.ndarray:
    u = rng.random_sample(image.shape)
    noisy = image.copy()
    noisy[u < amount * salt_fraction] = 1.0
    noisy[(u >= amount * salt_fraction) & (u < amount)] = 0.0
    return noisy


class MixtureNoise(_ImageNoise):
    """Poisson, Gaussian and impulse noise together, clipped to [0, 1]: BasicSR Poisson noise with
    ``poisson_scale``, then Gaussian ``sigma``, then salt-and-pepper ``amount``.

    Args:
        sigma: Gaussian standard deviation in 1/255 units.
        poisson_scale: scale of the Poisson component (0 switches it off).
        amount: salt-and-pepper fraction (0 switches it off).
        fixed_seed: see :class:`_ImageNoise`.
    """

    def __init__(
        self, sigma: float, poisson_scale: float = 1.0, amount: float = 0.01, fixed_seed: int | None = None
    ) -> None:
        super().__init__(fixed_seed)
        self.sigma = float(sigma)
        self.poisson_scale = float(poisson_scale)
        self.amount = float(amount)

    def _noisy_hwc(self, image: np.ndarray) -> np.ndarray:
        noisy = image.astype(np.float64)
        if self.poisson_scale > 0:
            noisy = noisy + _poisson_noise(self.R, image, self.poisson_scale)
        noisy = np.clip(noisy + self.R.normal(0, self.sigma / 255.0, image.shape), 0, 1)
        if self.amount > 0:
            noisy = _salt_pepper(self.R, noisy, self.amount, 0.5)
        return noisy


class _ImageNoised(Randomizable, MapTransform):
    """Dictionary twin: applies one array noise transform to each key, drawing from one generator."""

    def __init__(
        self, keys: KeysCollection, transform: _ImageNoise, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draws happen in the array transform."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class GaussianNoised(_ImageNoised):
    """Dictionary version of :class:`GaussianNoise`.

    Args:
        keys: keys of the images to corrupt.
        sigma: standard deviation in 1/255 units.
        fixed_seed: reset the generator to this seed before each image (reference protocol), or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, GaussianNoise(sigma, fixed_seed), allow_missing_keys)


class SpatialGaussianNoised(_ImageNoised):
    """Dictionary version of :class:`SpatialGaussianNoise`.

    Args:
        keys: keys of the images to corrupt.
        sigma: white-noise standard deviation before the 3x3 box filter, in 1/255 units.
        fixed_seed: reset the generator to this seed before each image (reference protocol), or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, SpatialGaussianNoise(sigma, fixed_seed), allow_missing_keys)


class PoissonNoised(_ImageNoised):
    """Dictionary version of :class:`PoissonNoise`.

    Args:
        keys: keys of the images to corrupt.
        scale: noise scale.
        fixed_seed: reset the generator to this seed before each image (reference protocol), or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, PoissonNoise(scale, fixed_seed), allow_missing_keys)


class SpeckleNoised(_ImageNoised):
    """Dictionary version of :class:`SpeckleNoise`.

    Args:
        keys: keys of the images to corrupt.
        sigma: standard deviation of the multiplicative factor, in 1/255 units.
        clip: clip the result to [0, 1].
        fixed_seed: reset the generator to this seed before each image, or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float,
        clip: bool = False,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, SpeckleNoise(sigma, clip, fixed_seed), allow_missing_keys)


class SaltPepperNoised(_ImageNoised):
    """Dictionary version of :class:`SaltPepperNoise`.

    Args:
        keys: keys of the images to corrupt.
        amount: fraction of samples replaced.
        salt_fraction: fraction of the replaced samples set to 1.
        fixed_seed: reset the generator to this seed before each image, or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        amount: float,
        salt_fraction: float = 0.5,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, SaltPepperNoise(amount, salt_fraction, fixed_seed), allow_missing_keys)


class MixtureNoised(_ImageNoised):
    """Dictionary version of :class:`MixtureNoise`.

    Args:
        keys: keys of the images to corrupt.
        sigma: Gaussian standard deviation in 1/255 units.
        poisson_scale: scale of the Poisson component.
        amount: salt-and-pepper fraction.
        fixed_seed: reset the generator to this seed before each image, or None.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float,
        poisson_scale: float = 1.0,
        amount: float = 0.01,
        fixed_seed: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, MixtureNoise(sigma, poisson_scale, amount, fixed_seed), allow_missing_keys)


# noise type name -> array transform whose first argument is the level used in the suites
NOISE_TYPES: dict[str, type[_ImageNoise]] = {
    "gaussian": GaussianNoise,
    "spatial_gaussian": SpatialGaussianNoise,
    "poisson": PoissonNoise,
    "speckle": SpeckleNoise,
    "salt_pepper": SaltPepperNoise,
    "mixture": MixtureNoise,
}

# suite name -> {noise type: levels}; levels in the unit of each type's first argument (sigma in 1/255,
# Poisson scale, salt-and-pepper fraction). "paper" is the reference's synthetic test protocol.
NOISE_SUITES: dict[str, dict[str, list[float]]] = {
    "paper": {"gaussian": [15, 25, 50], "spatial_gaussian": [40, 45, 50, 55], "poisson": [2, 2.5, 3, 3.5]},
    "gaussian": {"gaussian": [15, 25, 50]},
    "spatial": {"spatial_gaussian": [40, 45, 50, 55]},
    "poisson": {"poisson": [2, 2.5, 3, 3.5]},
    "ours": {"speckle": [25, 50, 75], "salt_pepper": [0.01, 0.03, 0.05], "mixture": [10, 20, 30]},
}


def make_noise(noise_type: str, level: float, fixed_seed: int | None = 0) -> _ImageNoise:
    """The array transform for one (noise type, level) entry of a suite.

    Args:
        noise_type: a key of :data:`NOISE_TYPES`.
        level: the type's level (sigma in 1/255, Poisson scale, salt-and-pepper fraction).
        fixed_seed: per-image seed; 0 is the reference protocol.
    """
    if noise_type not in NOISE_TYPES:
        raise InputError(f"unknown noise type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}")
    return NOISE_TYPES[noise_type](level, fixed_seed=fixed_seed)


def load_noise_suites(path: str | os.PathLike | None = None) -> dict[str, dict[str, list[float]]]:
    """Noise suites from a JSON file ``{suite: {noise type: [levels]}}``, or the built-in
    :data:`NOISE_SUITES` when ``path`` is None.

    Raises:
        InputError: the file is missing, not JSON, or names an unknown noise type or a non-numeric level.
    """
    if path is None:
        return {name: {k: list(v) for k, v in suite.items()} for name, suite in NOISE_SUITES.items()}
    path = Path(path)
    try:
        suites = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise InputError(f"noise suite file not found: {path}") from error
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read noise suites from {path}: {error}; fix the JSON") from error
    if not isinstance(suites, dict):
        raise InputError(f"{path} must hold a JSON object {{suite: {{noise type: [levels]}}}}")
    suites.pop("_comment", None)
    for name, suite in suites.items():
        if not isinstance(suite, dict) or not suite:
            raise InputError(f"suite {name!r} in {path} must map noise types to lists of levels")
        for noise_type, levels in suite.items():
            if noise_type not in NOISE_TYPES:
                raise InputError(
                    f"suite {name!r} in {path}: unknown noise type {noise_type!r}; use one of {', '.join(NOISE_TYPES)}"
                )
            if (
                not isinstance(levels, list)
                or not levels
                or not all(isinstance(v, (int, float)) for v in levels)
            ):
                raise InputError(
                    f"suite {name!r} in {path}: levels of {noise_type!r} must be a list of numbers"
                )
    return suites
