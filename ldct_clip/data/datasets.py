"""CT slice datasets for training and evaluation: layouts, patient-wise split, slice cache, data stream.

Layouts (``detect_layout`` tells them apart):

- ``"mayo_npy"``: the research code's Mayo-2016 layout, one file per slice,
  ``{patient}_{slice}_{input|target}.npy`` (``L067_0_target.npy``), already in the model range
  x = (HU + 1024) / 4096. Training uses the ``target`` (normal-dose) slices of the training patients;
  validation and evaluation the ``input``/``target`` pairs of the held-out patients.
- ``"volumes"``: normal-dose volumes, one patient per DICOM series (a folder) or NIfTI file
  (``*.nii``/``*.nii.gz``) anywhere under the root. The patient id is the file name without extension
  (NIfTI) or the series folder's path relative to the root, with "/" turned into "_" (DICOM).
- ``"pairs"`` (evaluation): low-/normal-dose pairs, either ``{patient}/low/`` and ``{patient}/full/``
  (each a DICOM series folder or a folder holding one NIfTI file), or files ``{patient}_low.nii[.gz]`` and
  ``{patient}_full.nii[.gz]`` side by side; the Mayo npy layout is also accepted as pairs.

Volumes are decoded once (``ldct_clip.io.load_ct``), normalised with ``HUToModelRange`` and reoriented
to ``SLICE_ORIENTATION`` (the orientation ``ldct_clip.inference`` feeds the network), then cached as
float32 ``.npy`` arrays (Z, H, W) under a cache folder and read back memory-mapped: an epoch never
decodes DICOM again, and worker processes share the pages.

Training reads an endless *stream*: item ``p`` of :class:`StreamDataset` is slice
``perm_k[p mod n]`` (``perm_k`` a seeded permutation for the k-th pass over the slices) with its random
crop/flip/noise drawn from a generator seeded by ``(seed, p)``. The stream is a pure function of the
seed, so a run resumed at iteration i (``StreamSampler(start_iteration=i)``) sees exactly the batches an
uninterrupted run would, whatever the number of loader workers.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureTyped,
    MapTransform,
    RandGaussianNoised,
    Randomizable,
    RandSpatialCropd,
    SpatialPadd,
)
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from ldct_clip.errors import InputError
from ldct_clip.io.dicom_series import is_dicom_file
from ldct_clip.transforms.augment import RandDihedrald

__all__ = [
    "NOISE_KINDS",
    "SLICE_ORIENTATION",
    "TRAIN_NOISE_STD",
    "AddNoised",
    "CTSliceDataset",
    "PairedSliceDataset",
    "SelectNoiseRealizationd",
    "SimulatedNoiseCache",
    "StreamDataset",
    "StreamSampler",
    "VolumeSliceCache",
    "detect_layout",
    "find_mayo_npy",
    "find_pairs",
    "find_volumes",
    "load_pair_volumes",
    "make_train_dataset",
    "make_val_dataset",
    "split_patients",
    "train_transforms",
]

#: In-plane orientation of the slices the network sees; must match ``ldct_clip.inference``'s default.
SLICE_ORIENTATION = "LPS"

#: The paper's training noise: Gaussian, sigma 5/255 on the model range, not clipped.
TRAIN_NOISE_STD = 5.0 / 255.0

#: Training noise kinds: the paper's Gaussian, or cached realisations of ``ldct_clip.simulation``'s low dose.
NOISE_KINDS = ("gaussian", "simulated")

_MAYO_NAME = re.compile(r"^(?P<patient>.+)_(?P<slice>\d+)_(?P<kind>input|target)\.npy$")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_dir(root: str | os.PathLike, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{what} {str(root)!r} is not a folder: give the folder that holds the data")
    return root


def find_mayo_npy(root: str | os.PathLike) -> list[dict]:
    """Slices of the Mayo npy layout: ``{"patient", "slice", "input", "target"}`` sorted by patient, slice.

    ``input`` is None where a slice has only a target (training-only data).
    """
    root = _check_dir(root, "data folder")
    slices: dict[tuple[str, int], dict] = {}
    for path in root.glob("*.npy"):
        match = _MAYO_NAME.match(path.name)
        if match is None:
            continue
        key = (match["patient"], int(match["slice"]))
        record = slices.setdefault(key, {"patient": key[0], "slice": key[1], "input": None, "target": None})
        record[match["kind"]] = path
    return [slices[k] for k in sorted(slices) if slices[k]["target"] is not None]


def _dicom_dirs(root: Path) -> list[Path]:
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        if any(is_dicom_file(Path(dirpath) / name) for name in sorted(filenames)[:3]):
            dirs.append(Path(dirpath))
    return sorted(dirs)


def find_volumes(root: str | os.PathLike) -> list[dict]:
    """Normal-dose volumes under ``root``: ``{"patient", "path"}``, one per NIfTI file or DICOM folder.

    Raises:
        InputError: two volumes map to the same patient id.
    """
    root = _check_dir(root, "data folder")
    volumes = [{"patient": _nifti_stem(p), "path": p} for p in sorted(root.rglob("*")) if _is_nifti(p)]
    for d in _dicom_dirs(root):
        rel = d.relative_to(root).as_posix()
        volumes.append({"patient": rel.replace("/", "_") if rel != "." else root.name, "path": d})
    seen: dict[str, Path] = {}
    for v in volumes:
        if v["patient"] in seen:
            raise InputError(
                f"two volumes give patient id {v['patient']!r} ({seen[v['patient']]} and {v['path']}): "
                "rename one so each patient has one series or file"
            )
        seen[v["patient"]] = v["path"]
    return sorted(volumes, key=lambda v: v["patient"])


def _single_volume(folder: Path) -> Path:
    niftis = sorted(p for p in folder.iterdir() if _is_nifti(p))
    if len(niftis) == 1:
        return niftis[0]
    if len(niftis) > 1:
        raise InputError(
            f"{folder} holds {len(niftis)} NIfTI files: keep one volume per low/ or full/ folder"
        )
    return folder  # a DICOM series folder; load_ct says so if it is not one


def find_pairs(root: str | os.PathLike) -> list[dict]:
    """Low-/normal-dose pairs for evaluation: ``{"patient", "kind", "low", "full"}``.

    ``kind`` is ``"volume"`` (``low``/``full`` are a DICOM folder or NIfTI file each) or ``"mayo_npy"``
    (``low``/``full`` are lists of per-slice npy files in slice order).

    Raises:
        InputError: no pairs found, or a patient with only one of the two.
    """
    root = _check_dir(root, "pairs folder")
    pairs: list[dict] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        low, full = sub / "low", sub / "full"
        if low.is_dir() or full.is_dir():
            if not (low.is_dir() and full.is_dir()):
                raise InputError(f"{sub} needs both low/ and full/ folders (low-dose and normal-dose)")
            pairs.append(
                {
                    "patient": sub.name,
                    "kind": "volume",
                    "low": _single_volume(low),
                    "full": _single_volume(full),
                }
            )
    files = {_nifti_stem(p): p for p in root.iterdir() if _is_nifti(p)}
    for stem in sorted(files):
        if stem.endswith("_low"):
            patient = stem[: -len("_low")]
            if f"{patient}_full" not in files:
                raise InputError(f"{files[stem].name} has no normal-dose partner: add {patient}_full.nii.gz")
            pairs.append(
                {"patient": patient, "kind": "volume", "low": files[stem], "full": files[f"{patient}_full"]}
            )
    mayo = [s for s in find_mayo_npy(root) if s["input"] is not None]
    for patient, group in itertools.groupby(mayo, key=lambda s: s["patient"]):
        group = list(group)
        pairs.append(
            {
                "patient": patient,
                "kind": "mayo_npy",
                "low": [s["input"] for s in group],
                "full": [s["target"] for s in group],
                "slices": [s["slice"] for s in group],
            }
        )
    if not pairs:
        raise InputError(
            f"no low-/normal-dose pairs in {root}: use {{patient}}/low/ + {{patient}}/full/ folders, "
            "{patient}_low.nii.gz + {patient}_full.nii.gz files, or {patient}_{slice}_input|target.npy"
        )
    return sorted(pairs, key=lambda p: p["patient"])


def detect_layout(root: str | os.PathLike) -> str:
    """``"mayo_npy"`` if ``root`` holds ``*_target.npy`` slices, else ``"volumes"``."""
    root = _check_dir(root, "data folder")
    return "mayo_npy" if any(_MAYO_NAME.match(p.name) for p in root.glob("*.npy")) else "volumes"


def split_patients(
    patients: Sequence[str],
    val_patients: Sequence[str] | str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Patient-wise train/validation split.

    Args:
        patients: all patient ids.
        val_patients: ids held out for validation (the paper: ``["L506"]``); a comma-separated string is
            accepted. Takes precedence over ``val_fraction``.
        val_fraction: else this fraction of the patients (at least one), drawn with ``seed``.
        seed: seed of the fractional draw.

    Raises:
        InputError: unknown validation patient, or no patient left for training.
    """
    patients = sorted(set(patients))
    if isinstance(val_patients, str):
        val_patients = [v for v in val_patients.split(",") if v]
    if val_patients:
        unknown = sorted(set(val_patients) - set(patients))
        if unknown:
            raise InputError(
                f"validation patient(s) {', '.join(unknown)} not in the data (patients: {', '.join(patients)})"
            )
        val = sorted(set(val_patients))
    elif val_fraction:
        if not 0 < val_fraction < 1:
            raise InputError(f"val_fraction={val_fraction} must be between 0 and 1")
        n_val = max(1, round(val_fraction * len(patients)))
        rng = np.random.default_rng(seed)
        val = sorted(rng.choice(patients, size=n_val, replace=False).tolist())
    else:
        val = []
    train = [p for p in patients if p not in val]
    if not train:
        raise InputError(
            f"no patient left for training: {len(patients)} patient(s), all held out for validation"
        )
    return train, val


class VolumeSliceCache:
    """Decodes a CT volume once and keeps its normalised slices as a memory-mapped float32 array.

    The cache file name hashes the volume's path, size and modification times and the normalisation, so an
    edited or replaced volume is decoded again. Files are written atomically (temporary file + rename),
    so concurrent ranks/workers may fill the same cache safely.

    Args:
        cache_dir: folder of the ``.npy`` cache files (created when needed).
        orientation: axis codes the volume is reoriented to before slicing along the last axis.
        hu_range: HU interval mapped to [0, 1] (``HUToModelRange``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        orientation: str | None = SLICE_ORIENTATION,
        hu_range: tuple[float, float] = (-1024.0, 3072.0),
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.orientation = orientation
        self.hu_range = tuple(float(v) for v in hu_range)

    def _key(self, path: Path) -> str:
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256(f"{path}|{self.orientation}|{self.hu_range}|v1".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def load_oriented(self, path: str | os.PathLike):
        """The HU volume at ``path`` (``MetaTensor`` (1, X, Y, Z)) reoriented to ``orientation``."""
        from monai.transforms import Orientation

        from ldct_clip.io import load_ct

        volume = load_ct(path)
        if self.orientation is not None:
            volume = Orientation(axcodes=self.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(
                volume
            )
        return volume

    def decode(self, path: str | os.PathLike) -> np.ndarray:
        """The volume at ``path`` as a normalised float32 array (Z, H, W), without caching."""
        from ldct_clip.transforms import HUToModelRange

        volume = self.load_oriented(path)
        x = HUToModelRange(hu_min=self.hu_range[0], hu_max=self.hu_range[1])(volume)
        x = torch.as_tensor(x)[0].permute(2, 0, 1)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    def _save(self, target: Path, array: np.ndarray) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def slices(self, path: str | os.PathLike) -> np.ndarray:
        """Memory-mapped (Z, H, W) normalised slices of the volume at ``path``, decoding it the first time."""
        path = Path(path)
        target = self.cache_dir / f"{self._key(path)}.npy"
        if not target.exists():
            self._save(target, self.decode(path))
        return np.load(target, mmap_mode="r")


class SimulatedNoiseCache(VolumeSliceCache):
    """Realisations of simulated low-dose noise of a CT volume, in model units, cached like its slices.

    Realisation ``k`` of a volume is ``simulate_low_dose(volume_hu, dose, seed=s_k) - volume_hu`` (the
    projection-domain model of ``ldct_clip.simulation``: anatomy untouched, noise only) divided by the
    width of ``hu_range`` (4096 HU by default, the scale of ``HUToModelRange``), so ``clean + noise`` is
    the simulated low-dose slice in the model range. The volume is simulated in the same orientation as
    :class:`VolumeSliceCache` stores its slices, so noise slice ``z`` lies exactly on clean slice ``z``;
    padding outside the field of view gets no noise. The slice thickness is, unless given, the one
    ``ldct-clip simulate`` uses (DICOM SliceThickness, else the slice spacing). ``s_k`` hashes the
    caller's volume name and ``k``, so patients of the same size do not share their noise draws.

    Each realisation is a float32 ``.npy`` file (Z, H, W), read back memory-mapped, named by a hash of the
    volume's path, size and modification times, the normalisation, the dose, the realisation's seed and
    the simulation parameters: a second dataset construction simulates nothing.

    Args:
        cache_dir: folder of the ``.npy`` cache files (created when needed).
        dose: dose fraction of the simulated scan (0.25: quarter dose).
        photons: full-dose photon count of the simulation (None: ``ldct_clip.simulation.DEFAULT_PHOTONS``).
        n_views: projection angles (None: ``ldct_clip.simulation.DEFAULT_N_VIEWS``); fewer is faster.
        slice_thickness: slice thickness (mm) of the simulation (None: the volume's, as ``ldct-clip
            simulate``; ``simulate_low_dose`` called directly assumes 3 mm).
        workers: simulation processes (None: one per CPU).
        progress: show the simulation's progress bars.
        orientation: axis codes of the slices (as :class:`VolumeSliceCache`).
        hu_range: HU interval of the model range (as :class:`VolumeSliceCache`).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        dose: float = 0.25,
        photons: float | None = None,
        n_views: int | None = None,
        slice_thickness: float | None = None,
        workers: int | None = None,
        progress: bool = True,
        orientation: str | None = SLICE_ORIENTATION,
        hu_range: tuple[float, float] = (-1024.0, 3072.0),
    ) -> None:
        from ldct_clip.simulation import DEFAULT_N_VIEWS, DEFAULT_PHOTONS

        super().__init__(cache_dir, orientation, hu_range)
        if not 0.0 < float(dose) <= 1.0:
            raise InputError(
                f"noise_dose={dose} must be a dose fraction in (0, 1], e.g. 0.25 for quarter dose"
            )
        self.dose = float(dose)
        self.photons = float(DEFAULT_PHOTONS if photons is None else photons)
        self.n_views = int(DEFAULT_N_VIEWS if n_views is None else n_views)
        self.slice_thickness = None if slice_thickness is None else float(slice_thickness)
        self.workers = workers
        self.progress = progress

    @staticmethod
    def realization_seed(name: str, k: int) -> int:
        """The simulation seed of realisation ``k`` of the volume called ``name`` (stable across machines)."""
        return int(hashlib.sha256(f"{name}|{k}".encode()).hexdigest()[:8], 16)

    def _noise_key(self, path: Path, seed: int) -> str:
        simulation = f"{self.dose}|{seed}|{self.photons}|{self.n_views}|{self.slice_thickness}"
        params = f"{self._key(path)}|noise|{simulation}|v1"
        return hashlib.sha256(params.encode()).hexdigest()[:32]

    def noise(
        self, path: str | os.PathLike, realizations: int = 2, name: str | None = None
    ) -> list[np.ndarray]:
        """``realizations`` memory-mapped (Z, H, W) noise arrays of the volume at ``path``.

        Args:
            path: NIfTI file or DICOM series folder.
            realizations: how many independent realisations.
            name: the volume's name for the seeds (the patient id; default the file/folder name).
        """
        from ldct_clip.cli.simulate import _slice_thickness  # the thickness `ldct-clip simulate` uses
        from ldct_clip.conventions import FOV_PADDING_THRESHOLD_HU
        from ldct_clip.simulation import simulate_low_dose

        path = Path(path)
        name = path.name if name is None else name
        seeds = [self.realization_seed(name, k) for k in range(int(realizations))]
        targets = [self.cache_dir / f"{self._noise_key(path, s)}.npy" for s in seeds]
        volume = None
        for k, (seed, target) in enumerate(zip(seeds, targets)):
            if target.exists():
                continue
            if volume is None:
                volume = self.load_oriented(path)
                hu = torch.as_tensor(volume).detach().cpu().numpy()[0].astype(np.float32)
                thickness = _slice_thickness(volume) if self.slice_thickness is None else self.slice_thickness
            if self.progress:
                tqdm.write(f"simulating training noise of {name} ({k + 1}/{len(seeds)}, dose {self.dose:g})")
            low = simulate_low_dose(
                volume,
                self.dose,
                photons=self.photons,
                n_views=self.n_views,
                seed=seed,
                workers=self.workers,
                progress=self.progress,
                slice_thickness=thickness,
            )
            noise = (torch.as_tensor(low).detach().cpu().numpy()[0] - hu) / (
                self.hu_range[1] - self.hu_range[0]
            )
            noise[hu < FOV_PADDING_THRESHOLD_HU] = 0.0  # HUToModelRange turns padding into flat air
            self._save(target, np.ascontiguousarray(np.transpose(noise, (2, 0, 1)), dtype=np.float32))
        return [np.load(t, mmap_mode="r") for t in targets]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("LDCT_CLIP_CACHE", Path.home() / ".cache" / "ldct_clip" / "slices"))


class CTSliceDataset(Dataset):
    """Normal-dose slices of some patients, as ``{"label": (1, H, W) float32, "patient", "slice"}``.

    With ``noise`` (a :class:`SimulatedNoiseCache`), items also carry ``"noise"``: the
    ``noise_realizations`` cached realisations of simulated low-dose noise of that slice, (R, H, W) float32;
    :class:`SelectNoiseRealizationd` picks one. Simulated noise needs the HU volume and its geometry, so it
    is for the volumes layout only: the Mayo npy slices are already normalised, without pixel size or
    thickness, and their ``_input`` slices are the real low dose (evaluation data, not training noise).

    Args:
        data_dir: folder in the ``"mayo_npy"`` or ``"volumes"`` layout.
        patients: the patients to include (None: all).
        cache_dir: slice cache of the volumes layout (default ``$LDCT_CLIP_CACHE`` or
            ``~/.cache/ldct_clip/slices``); also where ``noise`` is cached when it has no folder of its own.
        transform: applied to each item (None: none).
        noise: cache of simulated noise (None: items without ``"noise"``).
        noise_realizations: realisations per volume.

    Raises:
        InputError: ``noise`` with the Mayo npy layout.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        patients: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        transform: Callable | None = None,
        noise: SimulatedNoiseCache | None = None,
        noise_realizations: int = 2,
    ) -> None:
        self.layout = detect_layout(data_dir)
        self.transform = transform
        self._items: list[tuple[str, int, Callable[[], np.ndarray], Callable[[], np.ndarray] | None]] = []
        if self.layout == "mayo_npy":
            if noise is not None:
                raise InputError(
                    f"{data_dir} holds Mayo npy slices (normalised, no pixel size): simulated training noise "
                    "needs CT volumes (NIfTI files or DICOM series); use noise 'gaussian' with this data"
                )
            for s in find_mayo_npy(data_dir):
                if patients is None or s["patient"] in patients:
                    self._items.append((s["patient"], s["slice"], _npy_reader(s["target"]), None))
        else:
            if int(noise_realizations) < 1:
                raise InputError(f"noise_realizations={noise_realizations} must be at least 1")
            cache = VolumeSliceCache(cache_dir or _default_cache_dir())
            volumes = [v for v in find_volumes(data_dir) if patients is None or v["patient"] in patients]
            for v in volumes:
                array = cache.slices(v["path"])
                noises = None
                if noise is not None:
                    noises = noise.noise(v["path"], int(noise_realizations), name=v["patient"])
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


def _npy_reader(path: Path) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(np.load(path, mmap_mode="r"), dtype=np.float32)


def _slice_reader(array: np.ndarray, z: int) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(array[z], dtype=np.float32)


def _sum_reader(array: np.ndarray, noise: np.ndarray, z: int) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(array[z], dtype=np.float32) + np.asarray(noise[z], dtype=np.float32)


def _stack_reader(arrays: Sequence[np.ndarray], z: int) -> Callable[[], np.ndarray]:
    return lambda: np.stack([np.asarray(a[z], dtype=np.float32) for a in arrays])


class SelectNoiseRealizationd(Randomizable, MapTransform):
    """Replace the (R, H, W) stack of noise realisations under ``keys`` by one of them, (1, H, W).

    The realisation is drawn uniformly with the transform's own random state, so a
    :class:`StreamDataset` (which reseeds its transforms per stream position) draws the same one for the
    same position. Our own transform: MONAI has no random channel selection.

    Args:
        keys: keys of the realisation stacks.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._index = 0

    def randomize(self, n: int) -> None:
        self._index = int(self.R.randint(n))

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        self.randomize(len(d[first]))
        for key in self.key_iterator(d):
            d[key] = d[key][self._index : self._index + 1]
        return d


class AddNoised(MapTransform):
    """``data[output_key] = data[key] + data[noise_key]``, not clipped (the noisy training input).

    Args:
        keys: the clean image key (one).
        noise_key: key of the noise, same shape.
        output_key: key of the sum.
    """

    def __init__(
        self, keys: KeysCollection = "label", noise_key: str = "noise", output_key: str = "image"
    ) -> None:
        super().__init__(keys)
        self.noise_key = noise_key
        self.output_key = output_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = d[key] + d[self.noise_key]
        return d


def train_transforms(
    crop_size: int = 128, noise_std: float = TRAIN_NOISE_STD, dihedral: bool = True, noise: str = "gaussian"
) -> Compose:
    """The paper's per-sample training transforms on ``{"label": clean slice}``.

    Random ``crop_size``^2 crop (slices smaller than that are reflect-padded first), one of the 8
    flips/rotations, then ``"image"`` = the clean crop plus Gaussian noise of std ``noise_std``, not
    clipped (MONAI's ``RandGaussianNoised`` with ``prob=1`` and a fixed std is exactly that). Output:
    plain float32 tensors (1, crop_size, crop_size).

    With ``noise="simulated"`` the items carry ``"noise"``, a stack of simulated noise realisations
    (:class:`CTSliceDataset` with a :class:`SimulatedNoiseCache`): one realisation is drawn, cropped and
    flipped together with ``"label"`` (same crop, same flip), and ``"image"`` = label + noise, not clipped;
    ``noise_std`` is unused.
    """
    if noise == "simulated":
        keys = ("label", "noise")
        transforms = [
            SelectNoiseRealizationd("noise"),
            SpatialPadd(keys, spatial_size=(crop_size, crop_size), mode="reflect"),
            RandSpatialCropd(keys, roi_size=(crop_size, crop_size), random_size=False),
        ]
        if dihedral:
            transforms.append(RandDihedrald(keys))
        transforms += [
            AddNoised("label", noise_key="noise", output_key="image"),
            EnsureTyped(("image", "label", "noise"), data_type="tensor", track_meta=False),
        ]
        return Compose(transforms)
    if noise != "gaussian":
        raise InputError(f"noise={noise!r} is not a training noise: use one of {', '.join(NOISE_KINDS)}")
    transforms = [
        SpatialPadd("label", spatial_size=(crop_size, crop_size), mode="reflect"),
        RandSpatialCropd("label", roi_size=(crop_size, crop_size), random_size=False),
    ]
    if dihedral:
        transforms.append(RandDihedrald("label"))
    transforms += [
        CopyItemsd("label", names="image"),
        RandGaussianNoised("image", prob=1.0, mean=0.0, std=noise_std, sample_std=False),
        # plain tensors: MetaTensor bookkeeping in every network op costs more than the network itself
        EnsureTyped(("image", "label"), data_type="tensor", track_meta=False),
    ]
    return Compose(transforms)


class StreamDataset(Dataset):
    """The endless, seeded training stream over a slice dataset (see the module docstring).

    Args:
        base: dataset of clean slices (e.g. :class:`CTSliceDataset` without transform).
        transform: random per-sample transforms (MONAI ``Randomizable``/``Compose``), reseeded per item.
        seed: seed of the whole stream.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self._pass: int | None = None
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.base)

    def _index(self, position: int) -> int:
        n = len(self.base)
        k = position // n
        if k != self._pass:
            self._perm = np.random.default_rng([self.seed, k, 0]).permutation(n)
            self._pass = k
        return int(self._perm[position % n])

    def __getitem__(self, position: int) -> dict:
        item = dict(self.base[self._index(position)])
        if hasattr(self.transform, "set_random_state"):
            seed = int(np.random.default_rng([self.seed, position, 1]).integers(2**31 - 1))
            self.transform.set_random_state(seed=seed)
        return self.transform(item)


class StreamSampler(Sampler):
    """Endless sampler of stream positions for :class:`StreamDataset`, sharded over ranks.

    Iteration i (0-based) of rank r gets positions ``(i * world_size + r) * batch_size + j``, j < batch_size,
    so the data depend only on the seed and the iteration. Use with ``DataLoader(batch_size=batch_size)``
    and an ``epoch_length`` on the engine (the sampler has no end). ``start_iteration`` is where the
    next ``iter()`` starts; :class:`ldct_clip.training.StreamPositionHandler` sets it from the engine
    when a run starts or resumes.
    """

    def __init__(
        self,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        start_iteration: int = 0,
    ) -> None:
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised and rank is None else (rank or 0)
            world_size = dist.get_world_size() if initialised and world_size is None else (world_size or 1)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iteration = int(start_iteration)

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count(self.start_iteration):
            first = (i * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


def _check_noise_kind(noise: str) -> None:
    if noise not in NOISE_KINDS:
        raise InputError(f"noise={noise!r} is not a training noise: use one of {', '.join(NOISE_KINDS)}")


def _simulated_noise_cache(
    noise: str,
    cache_dir: str | os.PathLike | None,
    dose: float,
    photons: float | None,
    views: int | None,
    thickness: float | None,
    workers: int | None,
    progress: bool,
) -> SimulatedNoiseCache | None:
    """The simulated-noise cache shared by the training and validation datasets, None for other noise."""
    if noise != "simulated":
        return None
    return SimulatedNoiseCache(
        cache_dir or _default_cache_dir(), dose, photons, views, thickness, workers, progress
    )


def make_train_dataset(
    data_dir: str | os.PathLike,
    val_patients: Sequence[str] | str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    crop_size: int = 128,
    noise_std: float = TRAIN_NOISE_STD,
    cache_dir: str | os.PathLike | None = None,
    noise: str = "gaussian",
    noise_dose: float = 0.25,
    noise_realizations: int = 2,
    noise_photons: float | None = None,
    noise_views: int | None = None,
    noise_thickness: float | None = None,
    noise_workers: int | None = None,
    progress: bool = True,
) -> StreamDataset:
    """The training stream: normal-dose slices of the training patients, cropped, flipped, noised.

    Args:
        data_dir: training data folder (``"mayo_npy"`` or ``"volumes"`` layout).
        val_patients: patients held out (see :func:`split_patients`).
        val_fraction: else this fraction of the patients is held out.
        seed: seed of the split and of the whole stream.
        crop_size: training crop size.
        noise_std: std of the Gaussian noise (model range), for ``noise="gaussian"``.
        cache_dir: slice and noise cache (see :class:`CTSliceDataset`).
        noise: ``"gaussian"`` (the paper) or ``"simulated"``: ``noise_realizations`` precomputed
            realisations per volume of ``ldct_clip.simulation.simulate_low_dose`` at ``noise_dose``
            (volumes layout only), one drawn per item.
        noise_dose: dose fraction of the simulated noise (0.25: quarter dose).
        noise_realizations: simulated realisations per volume.
        noise_photons: full-dose photons of the simulation (None: ``DEFAULT_PHOTONS``).
        noise_views: projection angles of the simulation (None: ``DEFAULT_N_VIEWS``).
        noise_thickness: slice thickness (mm) of the simulation (None: each volume's own).
        noise_workers: simulation processes (None: one per CPU).
        progress: show progress bars while simulating.

    Raises:
        InputError: unknown ``noise``, or simulated noise with the Mayo npy layout.
    """
    _check_noise_kind(noise)
    patients = _all_patients(data_dir)
    train, _ = split_patients(patients, val_patients, val_fraction, seed)
    simulated = _simulated_noise_cache(
        noise, cache_dir, noise_dose, noise_photons, noise_views, noise_thickness, noise_workers, progress
    )
    base = CTSliceDataset(
        data_dir, train, cache_dir=cache_dir, noise=simulated, noise_realizations=noise_realizations
    )
    return StreamDataset(base, train_transforms(crop_size, noise_std, noise=noise), seed=seed)


def _all_patients(data_dir: str | os.PathLike) -> list[str]:
    if detect_layout(data_dir) == "mayo_npy":
        patients = sorted({s["patient"] for s in find_mayo_npy(data_dir)})
    else:
        patients = [v["patient"] for v in find_volumes(data_dir)]
    if not patients:
        raise InputError(
            f"no CT data in {data_dir}: expected {{patient}}_{{slice}}_target.npy slices, DICOM series "
            "folders or NIfTI volumes (one patient each)"
        )
    return patients


class PairedSliceDataset(Dataset):
    """Validation slices ``{"image": noisy, "label": clean, "patient", "slice"}``, (1, H, W) float32 each.

    Mayo npy data give their real low-dose ``input``; volumes get Gaussian noise of std ``noise_std``
    seeded per slice (the same noisy slices at every validation), or, with ``noise`` (a
    :class:`SimulatedNoiseCache`), the first cached realisation of simulated low-dose noise of the volume
    (held-out patients: never seen in training).

    Args:
        data_dir: folder in the ``"mayo_npy"`` or ``"volumes"`` layout.
        patients: patients to include.
        noise_std: synthetic noise of the volumes layout.
        max_slices_per_patient: keep at most this many slices per patient, evenly spaced (None: all).
        cache_dir: slice cache of the volumes layout.
        seed: seed of the synthetic noise.
        noise: simulated noise for the volumes layout instead of the Gaussian (None: Gaussian).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        patients: Sequence[str],
        noise_std: float = TRAIN_NOISE_STD,
        max_slices_per_patient: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        noise: SimulatedNoiseCache | None = None,
    ) -> None:
        self.layout = detect_layout(data_dir)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        items: list[tuple[str, int, Callable[[], np.ndarray], Callable[[], np.ndarray] | None]] = []
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
            cache = VolumeSliceCache(cache_dir or _default_cache_dir())
            for v in find_volumes(data_dir):
                if v["patient"] in patients:
                    array = cache.slices(v["path"])
                    if noise is None:
                        items += [
                            (v["patient"], z, _slice_reader(array, z), None) for z in range(array.shape[0])
                        ]
                    else:
                        sim = noise.noise(v["path"], 1, name=v["patient"])[0]
                        items += [
                            (v["patient"], z, _slice_reader(array, z), _sum_reader(array, sim, z))
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
        patient, z, read_clean, read_noisy = self._items[index]
        clean = read_clean()[None].astype(np.float32)
        if read_noisy is not None:
            noisy = read_noisy()[None].astype(np.float32)
        else:
            rng = np.random.default_rng([self.seed, index, 2])
            noisy = (clean + rng.normal(0.0, self.noise_std, clean.shape)).astype(np.float32)
        return {"image": noisy, "label": clean, "patient": patient, "slice": z}


def make_val_dataset(
    data_dir: str | os.PathLike,
    val_patients: Sequence[str] | str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    noise_std: float = TRAIN_NOISE_STD,
    max_slices_per_patient: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    noise: str = "gaussian",
    noise_dose: float = 0.25,
    noise_photons: float | None = None,
    noise_views: int | None = None,
    noise_thickness: float | None = None,
    noise_workers: int | None = None,
    progress: bool = True,
) -> PairedSliceDataset:
    """The validation slices of the held-out patients (same split as :func:`make_train_dataset`).

    With ``noise="simulated"`` volumes are validated on one realisation of simulated low-dose noise
    (the ``noise_*`` arguments as in :func:`make_train_dataset`), so the best checkpoint is chosen on the
    noise the model is trained for; Mayo npy data always use their real low-dose input.

    Raises:
        InputError: no validation patient (give ``val_patients`` or ``val_fraction``), unknown ``noise``.
    """
    _check_noise_kind(noise)
    _, val = split_patients(_all_patients(data_dir), val_patients, val_fraction, seed)
    if not val:
        raise InputError("no validation patients: set val_patients (e.g. L506) or val_fraction (e.g. 0.2)")
    simulated = _simulated_noise_cache(
        noise, cache_dir, noise_dose, noise_photons, noise_views, noise_thickness, noise_workers, progress
    )
    return PairedSliceDataset(data_dir, val, noise_std, max_slices_per_patient, cache_dir, seed, simulated)


def load_pair_volumes(pair: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The (low, full) HU volumes (1, X, Y, Z) of a :func:`find_pairs` entry, and whether they are
    already in slice orientation (Mayo npy slices are: they are stored as the network saw them).

    Raises:
        InputError: the two volumes differ in shape.
    """
    from ldct_clip.metrics import model_range_to_hu

    if pair["kind"] == "mayo_npy":
        low = np.stack([np.load(p) for p in pair["low"]], axis=-1)[None].astype(np.float32)
        full = np.stack([np.load(p) for p in pair["full"]], axis=-1)[None].astype(np.float32)
        low_hu, full_hu, oriented = (
            model_range_to_hu(torch.from_numpy(low)),
            model_range_to_hu(torch.from_numpy(full)),
            True,
        )
    else:
        from ldct_clip.io import load_ct

        low_hu, full_hu, oriented = load_ct(pair["low"]), load_ct(pair["full"]), False
    if tuple(low_hu.shape) != tuple(full_hu.shape):
        raise InputError(
            f"patient {pair['patient']}: low-dose {tuple(low_hu.shape[1:])} and normal-dose "
            f"{tuple(full_hu.shape[1:])} volumes differ in size; give matching series"
        )
    return low_hu, full_hu, oriented
