"""CT training noise: what turns a clean normal-dose slice (model range ``x = (HU + 1024) / 4096``) into the
noisy input of a training or validation pair.

Two noise models, each an array transform with its dictionary twin:

- :class:`CTGaussianNoise` / :class:`CTGaussianNoised`: the paper's, ``x + N(0, std^2)`` with ``std = 5/255``
  on the model range, not clipped.
- :class:`SimulatedCTNoise` / :class:`SimulatedCTNoised`: quantum noise of a lower dose from the
  projection-domain simulation (``ldct_clip.simulation``), ``x + n_k`` with ``n_k`` one of a few
  precomputed realisations of the slice's noise. Simulating takes seconds per slice, far too slow per
  training sample, so ``ldct_clip.data.caches.SimulatedNoiseCache`` simulates each volume
  :attr:`SimulationSettings.realizations` times once, and these transforms pick one realisation per sample.
  The settings may be a mixture (lists of doses, reconstruction filters and slice thicknesses, one
  :class:`NoiseLevel` per realisation), so that one model sees the range of real low-dose scans.
  The datasets (``ldct_clip.data.ct_dataset``) read the :class:`SimulationSettings` of the transform they
  are given to fill that cache.

The dictionary twins make the training stream, reseeded per sample by MONAI's ``Compose``; the array twins
make the validation pairs, which seed each slice with its own ``numpy.random.default_rng((seed, index, 2))``
(so the array twins also take a numpy ``Generator`` as their random state, which MONAI's ``Randomizable``
does not). Each twin keeps the arithmetic its stream has always had, so the streams stay bit for bit what
they were: float32 noise added in float32 (MONAI's ``RandGaussianNoised``) for training, float64 noise
added in float64 for validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandGaussianNoised, Randomizable, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from ldct_clip.conventions import FBP_FILTERS
from ldct_clip.errors import InputError

__all__ = [
    "TRAIN_NOISE_STD",
    "CTGaussianNoise",
    "CTGaussianNoised",
    "NoiseLevel",
    "SimulatedCTNoise",
    "SimulatedCTNoised",
    "SimulationSettings",
]

#: The paper's training noise: Gaussian, std 5/255 of the model range, not clipped.
TRAIN_NOISE_STD = 5.0 / 255.0


@dataclass(frozen=True)
class NoiseLevel:
    """The simulation settings of one noise realisation.

    Args:
        dose: dose fraction in (0, 1].
        filter_name: FBP filter the noise is reconstructed with (``ldct_clip.conventions.FBP_FILTERS``, ramp
            the sharpest kernel, hann the smoothest).
        slice_thickness: slice thickness in mm (None: the volume's own).
    """

    dose: float
    filter_name: str = "ramp"
    slice_thickness: float | None = None


def _one_or_many(value, kind, name: str) -> tuple:
    """``value`` (one setting or a list of them) as a non-empty tuple of ``kind`` (None kept)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise InputError(f"{name}=[] needs at least one value")
    return tuple(None if v is None else kind(v) for v in values)


@dataclass(frozen=True)
class SimulationSettings:
    """How the simulated training noise is made: the settings of ``ldct_clip.simulation.simulate_low_dose``
    and the number of cached realisations per volume.

    ``dose``, ``slice_thickness`` and ``filter_name`` each take one value (every realisation alike) or a
    list: a mixture of noise levels. The mixture's levels are all the combinations of the lists
    (:attr:`levels`, dose varying fastest); realisation ``k`` of the volume called ``name`` is the level
    ``(offset(name) + k) % len(levels)`` (:meth:`level`), so a volume's realisations are distinct levels
    (all of them when ``realizations >= len(levels)``) and volumes start at different levels, which spreads
    the combinations over the training set when there are fewer realisations than levels.

    Args:
        dose: dose fraction(s) of the simulated scan (0.25: quarter dose).
        realizations: independent noise realisations simulated per volume (one is drawn per sample).
        photons: full-dose photon count (None: ``ldct_clip.simulation.DEFAULT_PHOTONS``).
        n_views: projection angles (None: ``ldct_clip.simulation.DEFAULT_N_VIEWS``); fewer is faster.
        slice_thickness: slice thickness(es) in mm (None: each volume's own,
            ``ldct_clip.simulation.slice_thickness``); thinner slices are noisier.
        workers: simulation processes (None: one per CPU).
        progress: show the simulation's progress bars.
        filter_name: FBP filter(s) of the noise (``ldct_clip.conventions.FBP_FILTERS``): reconstruction
            kernels from sharp (ramp) to smooth (hann).

    Raises:
        InputError: a dose outside (0, 1], a thickness that is not positive, an unknown filter, an empty
            list or fewer than one realisation.
    """

    dose: float | tuple[float, ...] = 0.25
    realizations: int = 2
    photons: float | None = None
    n_views: int | None = None
    slice_thickness: float | tuple[float | None, ...] | None = None
    workers: int | None = None
    progress: bool = True
    filter_name: str | tuple[str, ...] = "ramp"

    def __post_init__(self) -> None:
        doses = _one_or_many(self.dose, float, "dose")
        if not all(d is not None and 0.0 < d <= 1.0 for d in doses):
            raise InputError(f"dose={self.dose} must be dose fractions in (0, 1], e.g. 0.25 for quarter dose")
        thicknesses = _one_or_many(self.slice_thickness, float, "slice_thickness")
        if not all(t is None or t > 0 for t in thicknesses):
            raise InputError(f"slice_thickness={self.slice_thickness} must be thicknesses in mm above 0")
        filters = _one_or_many(self.filter_name, str, "filter_name")
        unknown = [f for f in filters if f not in FBP_FILTERS]
        if unknown:
            raise InputError(f"filter_name {unknown} unknown: choose from {', '.join(FBP_FILTERS)}")
        if int(self.realizations) < 1:
            raise InputError(f"realizations={self.realizations} must be at least 1")
        # frozen: normalise the types once (config files give ints for floats, lists for tuples); a list of
        # one value is that value, so a one-level mixture is the single level, cache files included
        for name, values in (("dose", doses), ("slice_thickness", thicknesses), ("filter_name", filters)):
            object.__setattr__(self, name, values[0] if len(values) == 1 else values)
        object.__setattr__(self, "realizations", int(self.realizations))
        for name, kind in (("photons", float), ("n_views", int), ("workers", int)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def levels(self) -> tuple[NoiseLevel, ...]:
        """Every combination of the dose, filter and thickness settings, dose varying fastest."""
        return tuple(
            NoiseLevel(dose, filter_name, thickness)
            for thickness in _one_or_many(self.slice_thickness, float, "slice_thickness")
            for filter_name in _one_or_many(self.filter_name, str, "filter_name")
            for dose in _one_or_many(self.dose, float, "dose")
        )

    @property
    def is_mixture(self) -> bool:
        """More than one noise level."""
        return len(self.levels) > 1

    def level(self, k: int, name: str = "") -> NoiseLevel:
        """The noise level of realisation ``k`` of the volume called ``name`` (see the class docstring).

        Args:
            k: realisation index.
            name: the volume's name (the patient id), which sets where its cycle through the levels starts.
        """
        levels = self.levels
        offset = int(hashlib.sha256(f"{name}|levels".encode()).hexdigest()[:8], 16) if len(levels) > 1 else 0
        return levels[(offset + int(k)) % len(levels)]


class _SeedableByGenerator(Randomizable):
    """MONAI's ``Randomizable`` whose random state may also be a numpy ``Generator`` (see the module text)."""

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | np.random.Generator | None = None
    ) -> _SeedableByGenerator:
        if isinstance(state, np.random.Generator):
            self.R = state
            return self
        super().set_random_state(seed, state)
        return self


class CTGaussianNoise(_SeedableByGenerator, Transform):
    """The paper's CT noise: ``x + N(0, std^2)`` on the model range, not clipped; float32 out, of the input's
    type. The noise is drawn in float64 and added in float64 (the validation pairs' arithmetic).

    Args:
        std: noise std in model units (5/255 in the paper; ``ldct-clip train --noise-sigma`` is in 1/255).
    """

    def __init__(self, std: float = TRAIN_NOISE_STD) -> None:
        self.std = float(std)
        self._noise: np.ndarray | None = None

    def randomize(self, shape: tuple[int, ...]) -> None:
        self._noise = self.R.normal(0.0, self.std, shape)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize or self._noise is None:
            self.randomize(tuple(img.shape))
        noisy = convert_to_numpy(img) + self._noise
        return convert_to_dst_type(noisy, img, dtype=np.float32)[0]


class CTGaussianNoised(RandGaussianNoised):
    """Dictionary version of :class:`CTGaussianNoise`: the noise is added to ``keys`` in place.

    MONAI's ``RandGaussianNoised`` with probability 1 and a fixed std (float32 noise added in float32).

    Args:
        keys: keys of the images to noise (the training input, ``"image"``: a copy of the clean crop).
        std: noise std in model units.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection = "image", std: float = TRAIN_NOISE_STD, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(
            keys, prob=1.0, mean=0.0, std=float(std), allow_missing_keys=allow_missing_keys, sample_std=False
        )


class SimulatedCTNoise(_SeedableByGenerator, Transform):
    """``image + realizations[k]``, not clipped, with ``k`` drawn uniformly: a slice with one of its
    precomputed realisations of simulated low-dose noise (see the module docstring).

    MONAI has no random selection among stacked alternatives, hence this transform.

    Args:
        settings: how the realisations are simulated (read by the datasets that fill the noise cache).
    """

    def __init__(self, settings: SimulationSettings | None = None) -> None:
        self.settings = settings if settings is not None else SimulationSettings()
        self._index = 0

    def randomize(self, count: int) -> None:
        draw = self.R.integers if isinstance(self.R, np.random.Generator) else self.R.randint
        self._index = int(draw(count))

    def pick(self, realizations: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """One realisation, (1, H, W), of the (R, H, W) stack ``realizations``."""
        if randomize:
            self.randomize(len(realizations))
        return realizations[self._index : self._index + 1]

    def __call__(
        self, img: NdarrayOrTensor, realizations: NdarrayOrTensor, randomize: bool = True
    ) -> NdarrayOrTensor:
        """Args:
        img: clean slice (1, H, W), model range.
        realizations: noise realisations of that slice (R, H, W), model units.
        randomize: draw a new realisation index (else the last one).
        """
        return img + self.pick(realizations, randomize)


class SimulatedCTNoised(Randomizable, MapTransform):
    """Dictionary version of :class:`SimulatedCTNoise`: ``data[output_key] = data[key] + n`` with ``n`` one
    realisation of the stack ``data[noise_key]``, which is replaced by ``n`` (1, H, W).

    The realisations are aligned with whole slices, so this runs before the crop and flip, which then
    apply to the clean, noisy and noise images alike.

    Args:
        keys: the clean image key (one), ``"label"``.
        settings: how the realisations are simulated.
        noise_key: key of the (R, H, W) realisations.
        output_key: key of the noisy image.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        settings: SimulationSettings | None = None,
        noise_key: str = "noise",
        output_key: str = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.add_noise = SimulatedCTNoise(settings)
        self.noise_key = noise_key
        self.output_key = output_key

    @property
    def settings(self) -> SimulationSettings:
        return self.add_noise.settings

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> SimulatedCTNoised:
        super().set_random_state(seed, state)
        self.add_noise.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        """The draw is the array transform's (:meth:`SimulatedCTNoise.pick`)."""

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if next(self.key_iterator(d), None) is None:
            return d
        d[self.noise_key] = self.add_noise.pick(d[self.noise_key])
        for key in self.key_iterator(d):
            d[self.output_key] = d[key] + d[self.noise_key]
        return d
