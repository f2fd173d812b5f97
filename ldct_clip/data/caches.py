"""Disk caches of decoded CT: normalised slices, and realisations of simulated low-dose noise.

Volumes are decoded once (``ldct_clip.io.load_ct``), normalised with ``HUToModelRange`` and reoriented
to ``ldct_clip.conventions.ORIENTATION`` (the orientation the network sees at inference), then cached as
float32 ``.npy`` arrays (Z, H, W) under a cache folder and read back memory-mapped: an epoch never
decodes DICOM again, and worker processes share the pages. Files are written atomically (temporary file +
rename), so concurrent ranks and workers may fill the same cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from tqdm.auto import tqdm

from ldct_clip.conventions import HU_RANGE, ORIENTATION, is_fov_padding
from ldct_clip.io import load_ct
from ldct_clip.simulation import DEFAULT_N_VIEWS, DEFAULT_PHOTONS, simulate_low_dose, slice_thickness
from ldct_clip.transforms.ct_noise import NoiseLevel, SimulationSettings
from ldct_clip.transforms.intensity import HUToModelRange

__all__ = ["SimulatedNoiseCache", "VolumeSliceCache", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LDCT_CLIP_CACHE``, else ``~/.cache/ldct_clip/slices``."""
    return Path(os.environ.get("LDCT_CLIP_CACHE", Path.home() / ".cache" / "ldct_clip" / "slices"))


class VolumeSliceCache:
    """Decodes a CT volume once and keeps its normalised slices as a memory-mapped float32 array.

    The cache file name hashes the volume's path, size and modification times and the normalisation, so an
    edited or replaced volume is decoded again.

    Args:
        cache_dir: folder of the ``.npy`` cache files (created when needed).
        orientation: axis codes the volume is reoriented to before slicing along the last axis.
        hu_range: HU interval mapped to [0, 1] (``HUToModelRange``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        orientation: str | None = ORIENTATION,
        hu_range: tuple[float, float] = HU_RANGE,
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

    def load_oriented(self, path: str | os.PathLike) -> MetaTensor:
        """The HU volume at ``path`` (``MetaTensor`` (1, X, Y, Z)) reoriented to ``orientation``."""
        volume = load_ct(path)
        if self.orientation is not None:
            volume = Orientation(axcodes=self.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(
                volume
            )
        return volume

    def decode(self, path: str | os.PathLike) -> np.ndarray:
        """The volume at ``path`` as a normalised float32 array (Z, H, W), without caching."""
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
    width of ``hu_range`` (the scale of ``HUToModelRange``), so ``clean + noise`` is the simulated
    low-dose slice in the model range. Its dose, FBP filter and slice thickness are the level
    ``settings.level(k, name)``: one level for all, or a mixture (``SimulationSettings``). The volume is
    simulated in the same orientation as :class:`VolumeSliceCache` stores its slices, so noise slice ``z``
    lies exactly on clean slice ``z``; padding outside the field of view gets no noise. The slice thickness
    is, unless set, ``ldct_clip.simulation.slice_thickness`` of the volume (what ``ldct-clip simulate``
    uses). ``s_k`` hashes the caller's volume name and ``k``, so patients of the same size do not share
    their noise draws.

    Each realisation is a float32 ``.npy`` file (Z, H, W), read back memory-mapped, named by a hash of the
    volume's path, size and modification times, the normalisation, the realisation's seed and every
    setting of its simulation (dose, photons, views, thickness, filter): a second dataset construction
    simulates nothing.

    Args:
        cache_dir: folder of the ``.npy`` cache files (created when needed).
        settings: dose(s), photons, views, thickness(es), filter(s), realisations and workers of the
            simulation.
        orientation: axis codes of the slices (as :class:`VolumeSliceCache`).
        hu_range: HU interval of the model range (as :class:`VolumeSliceCache`).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        settings: SimulationSettings | None = None,
        orientation: str | None = ORIENTATION,
        hu_range: tuple[float, float] = HU_RANGE,
    ) -> None:
        super().__init__(cache_dir, orientation, hu_range)
        self.settings = settings if settings is not None else SimulationSettings()
        self.photons = float(DEFAULT_PHOTONS if self.settings.photons is None else self.settings.photons)
        self.n_views = int(DEFAULT_N_VIEWS if self.settings.n_views is None else self.settings.n_views)

    @staticmethod
    def realization_seed(name: str, k: int) -> int:
        """The simulation seed of realisation ``k`` of the volume called ``name`` (stable across machines)."""
        return int(hashlib.sha256(f"{name}|{k}".encode()).hexdigest()[:8], 16)

    def _noise_key(self, path: Path, seed: int, level: NoiseLevel) -> str:
        simulation = f"{level.dose}|{seed}|{self.photons}|{self.n_views}|{level.slice_thickness}"
        if level.filter_name != "ramp":  # the ramp filter is implied: single-level keys are what they were
            simulation += f"|{level.filter_name}"
        params = f"{self._key(path)}|noise|{simulation}|v1"
        return hashlib.sha256(params.encode()).hexdigest()[:32]

    def noise(
        self, path: str | os.PathLike, realizations: int | None = None, name: str | None = None
    ) -> list[np.ndarray]:
        """``realizations`` memory-mapped (Z, H, W) noise arrays of the volume at ``path``.

        Args:
            path: NIfTI file or DICOM series folder.
            realizations: how many independent realisations (None: ``settings.realizations``).
            name: the volume's name for the seeds and levels (the patient id; default the file/folder name).
        """
        s = self.settings
        path = Path(path)
        name = path.name if name is None else name
        count = s.realizations if realizations is None else int(realizations)
        seeds = [self.realization_seed(name, k) for k in range(count)]
        levels = [s.level(k, name) for k in range(count)]
        targets = [
            self.cache_dir / f"{self._noise_key(path, seed, level)}.npy" for seed, level in zip(seeds, levels)
        ]
        volume = None
        for k, (seed, level, target) in enumerate(zip(seeds, levels, targets)):
            if target.exists():
                continue
            if volume is None:
                volume = self.load_oriented(path)
                hu = torch.as_tensor(volume).detach().cpu().numpy()[0].astype(np.float32)
                own_thickness = slice_thickness(volume)
            thickness = own_thickness if level.slice_thickness is None else level.slice_thickness
            if s.progress:
                what = f"dose {level.dose:g}"
                if s.is_mixture:
                    what += f", {level.filter_name} filter, {thickness:g} mm"
                tqdm.write(f"simulating training noise of {name} ({k + 1}/{len(seeds)}, {what})")
            low = simulate_low_dose(
                volume,
                level.dose,
                photons=self.photons,
                n_views=self.n_views,
                seed=seed,
                workers=s.workers,
                progress=s.progress,
                slice_thickness=thickness,
                filter_name=level.filter_name,
            )
            noise = (torch.as_tensor(low).detach().cpu().numpy()[0] - hu) / (
                self.hu_range[1] - self.hu_range[0]
            )
            noise[is_fov_padding(hu)] = 0.0  # HUToModelRange turns padding into flat air
            self._save(target, np.ascontiguousarray(np.transpose(noise, (2, 0, 1)), dtype=np.float32))
        return [np.load(t, mmap_mode="r") for t in targets]
