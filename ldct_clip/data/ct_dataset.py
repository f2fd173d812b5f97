"""CT slice datasets of the CT task: the training stream of noisy crops and the validation pairs.

The noise is a transform given by the configuration, as in the RGB tasks (``ldct_clip.data.images``): a
dictionary transform for training (``CTGaussianNoised``, the paper's, or ``SimulatedCTNoised``, the
projection-domain simulation) and an array transform for validation (``CTGaussianNoise``,
``SimulatedCTNoise``), both from ``ldct_clip.transforms``. Simulated noise needs its realisations cached
beforehand (``ldct_clip.data.caches.SimulatedNoiseCache``, filled with the transform's settings); the
datasets attach them to the items as ``"noise"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import Compose, CopyItemsd, EnsureTyped, RandSpatialCropd, SpatialPadd
from monai.utils import convert_to_numpy
from torch.utils.data import Dataset

from ldct_clip.data.caches import SimulatedNoiseCache, VolumeSliceCache, default_cache_dir
from ldct_clip.data.layouts import all_patients, detect_layout, find_mayo_npy, find_volumes, split_patients
from ldct_clip.data.stream import StreamDataset
from ldct_clip.errors import InputError
from ldct_clip.transforms.augment import RandDihedrald
from ldct_clip.transforms.ct_noise import (
    CTGaussianNoise,
    CTGaussianNoised,
    SimulatedCTNoise,
    SimulatedCTNoised,
)

__all__ = [
    "CTSliceDataset",
    "PairedSliceDataset",
    "ct_train_transforms",
    "make_train_dataset",
    "make_val_dataset",
]

_Reader = Callable[[], np.ndarray]


def _npy_reader(path: Path) -> _Reader:
    return lambda: np.asarray(np.load(path, mmap_mode="r"), dtype=np.float32)


def _slice_reader(array: np.ndarray, z: int) -> _Reader:
    return lambda: np.asarray(array[z], dtype=np.float32)


def _stack_reader(arrays: Sequence[np.ndarray], z: int) -> _Reader:
    return lambda: np.stack([np.asarray(a[z], dtype=np.float32) for a in arrays])


class CTSliceDataset(Dataset):
    """Normal-dose slices of some patients, as ``{"label": (1, H, W) float32, "patient", "slice"}``.

    With ``noise`` (a :class:`~ldct_clip.data.caches.SimulatedNoiseCache`), items also carry ``"noise"``:
    the cached realisations of simulated low-dose noise of that slice, (R, H, W) float32, R =
    ``noise.settings.realizations``; ``SimulatedCTNoised`` picks one. Simulated noise needs the HU volume
    and its geometry, so it is for the volumes layout only: the Mayo npy slices are already normalised,
    without pixel size or thickness, and their ``_input`` slices are the real low dose (evaluation data,
    not training noise).

    Args:
        data_dir: folder in the ``"mayo_npy"`` or ``"volumes"`` layout.
        patients: the patients to include (None: all).
        cache_dir: slice cache of the volumes layout (default ``ldct_clip.data.caches.default_cache_dir()``).
        transform: applied to each item (None: none).
        noise: cache of simulated noise (None: items without ``"noise"``).

    Raises:
        InputError: ``noise`` with the Mayo npy layout; no slices.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        patients: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        transform: Callable | None = None,
        noise: SimulatedNoiseCache | None = None,
    ) -> None:
        self.layout = detect_layout(data_dir)
        self.transform = transform
        self._items: list[tuple[str, int, _Reader, _Reader | None]] = []
        if self.layout == "mayo_npy":
            if noise is not None:
                raise InputError(
                    f"{data_dir} holds Mayo npy slices (normalised, no pixel size): simulated training noise "
                    "needs CT volumes (NIfTI files or DICOM series); use the Gaussian noise with this data"
                )
            for s in find_mayo_npy(data_dir):
                if patients is None or s["patient"] in patients:
                    self._items.append((s["patient"], s["slice"], _npy_reader(s["target"]), None))
        else:
            cache = VolumeSliceCache(cache_dir or default_cache_dir())
            volumes = [v for v in find_volumes(data_dir) if patients is None or v["patient"] in patients]
            for v in volumes:
                array = cache.slices(v["path"])
                noises = None
                if noise is not None:
                    noises = noise.noise(v["path"], name=v["patient"])
                    if any(n.shape != array.shape for n in noises):
                        raise InputError(
                            f"the noise cache of {v['path']} does not match it: delete {noise.cache_dir}"
                        )
                for z in range(array.shape[0]):
                    read_noise = _stack_reader(noises, z) if noises is not None else None
                    self._items.append((v["patient"], z, _slice_reader(array, z), read_noise))
        if not self._items:
            raise InputError(f"no CT slices found in {data_dir} for patients {patients}")

    @property
    def patients(self) -> list[str]:
        return sorted({item[0] for item in self._items})

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        patient, z, read, read_noise = self._items[index]
        item = {"label": read()[None].astype(np.float32), "patient": patient, "slice": z}
        if read_noise is not None:
            item["noise"] = read_noise()
        return self.transform(item) if self.transform is not None else item


def ct_train_transforms(
    crop_size: int = 128, noise: Callable | None = None, dihedral: bool = True
) -> Compose:
    """The paper's per-sample training transforms on ``{"label": clean slice}``: a random ``crop_size``^2
    crop (slices smaller than that are reflect-padded first), one of the 8 flips/rotations, and noise.
    Output: plain float32 tensors (1, crop_size, crop_size).

    Args:
        crop_size: square crop side.
        noise: the training noise (None: ``CTGaussianNoised()``, the paper's). A pixel-wise noise such as
            ``CTGaussianNoised("image")`` is added to ``"image"``, a copy of the clean crop. A
            ``SimulatedCTNoised`` needs the items' ``"noise"`` realisations (``CTSliceDataset`` with a
            ``SimulatedNoiseCache``): it makes ``"image"`` on the whole slice first, then the crop and flip
            hit ``"image"``, ``"label"`` and ``"noise"`` alike.
        dihedral: draw one of the 8 flips/rotations.
    """
    noise = noise if noise is not None else CTGaussianNoised("image")
    if isinstance(noise, SimulatedCTNoised):
        # realisations are aligned with whole slices; the sum commutes with the crop and flip, bit for bit
        keys = (noise.output_key, "label", noise.noise_key)
        transforms: list[Callable] = [
            noise,
            SpatialPadd(keys, spatial_size=(crop_size, crop_size), mode="reflect"),
            RandSpatialCropd(keys, roi_size=(crop_size, crop_size), random_size=False),
        ]
        if dihedral:
            transforms.append(RandDihedrald(keys))
    else:
        keys = ("image", "label")
        transforms = [
            SpatialPadd("label", spatial_size=(crop_size, crop_size), mode="reflect"),
            RandSpatialCropd("label", roi_size=(crop_size, crop_size), random_size=False),
        ]
        if dihedral:
            transforms.append(RandDihedrald("label"))
        transforms += [CopyItemsd("label", names="image"), noise]
    # plain tensors: MetaTensor bookkeeping in every network op costs more than the network itself
    transforms.append(EnsureTyped(keys, data_type="tensor", track_meta=False))
    return Compose(transforms)


def make_train_dataset(
    data_dir: str | os.PathLike,
    val_patients: Sequence[str] | str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    crop_size: int = 128,
    noise: Callable | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> StreamDataset:
    """The training stream: normal-dose slices of the training patients, cropped, flipped, noised.

    Args:
        data_dir: training data folder (``"mayo_npy"`` or ``"volumes"`` layout).
        val_patients: patients held out (see ``ldct_clip.data.layouts.split_patients``).
        val_fraction: else this fraction of the patients is held out.
        seed: seed of the split and of the whole stream.
        crop_size: training crop size.
        noise: dictionary transform of the training noise (see :func:`ct_train_transforms`); with a
            ``SimulatedCTNoised`` its settings' realisations are simulated per volume and cached first.
        cache_dir: slice and noise cache (see :class:`CTSliceDataset`).

    Raises:
        InputError: simulated noise with the Mayo npy layout.
    """
    train, _ = split_patients(all_patients(data_dir), val_patients, val_fraction, seed)
    simulated = None
    if isinstance(noise, SimulatedCTNoised):
        simulated = SimulatedNoiseCache(cache_dir or default_cache_dir(), noise.settings)
    base = CTSliceDataset(data_dir, train, cache_dir=cache_dir, noise=simulated)
    return StreamDataset(base, ct_train_transforms(crop_size, noise), seed=seed)


class PairedSliceDataset(Dataset):
    """Validation slices ``{"image": noisy, "label": clean, "patient", "slice"}``, (1, H, W) float32 each.

    Mayo npy data give their real low-dose ``input``. Volumes get ``noise``, reseeded before each slice with
    ``numpy.random.default_rng((seed, index, 2))``, so every validation sees the same noisy slices:
    ``CTGaussianNoise`` (the default) draws its noise from it; a ``SimulatedCTNoise`` adds the first cached
    realisation of the volume's simulated noise (held-out patients: never seen in training).

    Args:
        data_dir: folder in the ``"mayo_npy"`` or ``"volumes"`` layout.
        patients: patients to include.
        noise: the CT noise array transform of the volumes layout (None: ``CTGaussianNoise()``).
        max_slices_per_patient: keep at most this many slices per patient, evenly spaced (None: all).
        cache_dir: slice (and noise) cache of the volumes layout.
        seed: base seed of the noise.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        patients: Sequence[str],
        noise: CTGaussianNoise | SimulatedCTNoise | None = None,
        max_slices_per_patient: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        self.layout = detect_layout(data_dir)
        self.noise = noise if noise is not None else CTGaussianNoise()
        self.seed = int(seed)
        items: list[tuple[str, int, _Reader, _Reader | None]] = []
        if self.layout == "mayo_npy":
            for s in find_mayo_npy(data_dir):
                if s["patient"] in patients:
                    if s["input"] is None:
                        raise InputError(
                            f"{s['target']} has no low-dose partner {s['patient']}_{s['slice']}_input.npy"
                        )
                    items.append(
                        (s["patient"], s["slice"], _npy_reader(s["target"]), _npy_reader(s["input"]))
                    )
        else:
            cache_dir = cache_dir or default_cache_dir()
            cache = VolumeSliceCache(cache_dir)
            simulated = None
            if isinstance(self.noise, SimulatedCTNoise):
                one = dataclasses.replace(self.noise.settings, realizations=1)
                simulated = SimulatedNoiseCache(cache_dir, one)
            for v in find_volumes(data_dir):
                if v["patient"] in patients:
                    array = cache.slices(v["path"])
                    noises = None if simulated is None else simulated.noise(v["path"], name=v["patient"])
                    items += [
                        (
                            v["patient"],
                            z,
                            _slice_reader(array, z),
                            None if noises is None else _stack_reader(noises, z),
                        )
                        for z in range(array.shape[0])
                    ]
        if max_slices_per_patient:
            kept = []
            for _, group in itertools.groupby(items, key=lambda t: t[0]):
                group = list(group)
                idx = np.unique(
                    np.linspace(0, len(group) - 1, min(max_slices_per_patient, len(group)))
                    .round()
                    .astype(int)
                )
                kept += [group[i] for i in idx]
            items = kept
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        patient, z, read_clean, read_noise = self._items[index]
        clean = read_clean()[None].astype(np.float32)
        if self.layout == "mayo_npy":
            noisy = read_noise()[None]  # the real low dose
        else:
            self.noise.set_random_state(state=np.random.default_rng([self.seed, index, 2]))
            noisy = self.noise(clean) if read_noise is None else self.noise(clean, read_noise())
        return {
            "image": convert_to_numpy(noisy, dtype=np.float32),
            "label": clean,
            "patient": patient,
            "slice": z,
        }


def make_val_dataset(
    data_dir: str | os.PathLike,
    val_patients: Sequence[str] | str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    noise: CTGaussianNoise | SimulatedCTNoise | None = None,
    max_slices_per_patient: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PairedSliceDataset:
    """The validation slices of the held-out patients (same split as :func:`make_train_dataset`).

    Give ``noise`` the array twin of the training noise (``SimulatedCTNoise`` with the same settings for
    simulated training noise), so the best checkpoint is chosen on the noise the model is trained for;
    Mayo npy data always use their real low-dose input.

    Raises:
        InputError: no validation patient (give ``val_patients`` or ``val_fraction``).
    """
    _, val = split_patients(all_patients(data_dir), val_patients, val_fraction, seed)
    if not val:
        raise InputError("no validation patients: set val_patients (e.g. L506) or val_fraction (e.g. 0.2)")
    return PairedSliceDataset(data_dir, val, noise, max_slices_per_patient, cache_dir, seed)
