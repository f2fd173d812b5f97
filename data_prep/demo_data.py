"""Training and held-out data for the demo weights, from the development CT in ``../shared/data`` plus phantoms.

Dataset preparation, not library code: ``make_demo_training_data.py`` next to this file runs it.

:func:`prepare_demo_data` writes, under one output folder (atomically):

- ``train/``: normal-dose volumes, one "patient" per NIfTI file (the ``"volumes"`` layout of
  :mod:`ldct_clip.data.layouts`, what ``ldct-clip train --data`` reads):

  - ``totalseg_dicom_train.nii.gz``: slices 0-13 of the real DICOM series ``totalseg_example_ct_dicom``
    (512 x 512, 0.977 mm, 3 mm thick every 2 mm); slices 14-15 are left out as a gap, so that no training
    slab overlaps a held-out one (slice 13 ends 3 mm before slice 16 begins);
  - ``totalseg_dicom_train_{0p75,1p25}mm.nii.gz``: the same slices resampled in-plane to the pixel sizes
    ``dicom_spacings_mm`` (default 0.75 and 1.25 mm, bilinear, MONAI ``Spacing``): the anatomy and the
    simulated noise grain at the pixel scales of other fields of view;
  - ``totalseg_ct_1mm.nii.gz``, ``totalseg_ct_0p75mm.nii.gz``: the real volume ``totalseg_example_ct.nii.gz``
    (3 mm isotropic, another patient) resampled in-plane to each of ``nifti_spacing_mm`` (default 1 mm and
    0.75 mm), so that its anatomy has the pixel scale of the other training slices (0 keeps 3 mm); the
    volumes after the first keep every other slice, so that this blurry (3 mm) volume does not outnumber
    the sharp slices of the stream;
  - ``phantom_seed{1..8}.nii.gz``: noise-free phantoms of several sizes (anatomy scales with the matrix).

- ``heldout/``: low-/normal-dose pairs ``{name}_low.nii.gz`` + ``{name}_full.nii.gz`` (the ``"pairs"`` layout,
  what ``ldct-clip evaluate`` / ``ldct-clip benchmark`` read): DICOM slices 16-19 and their simulated
  quarter dose, and a phantom with a seed no training volume uses (99) with its simulated quarter dose.

- ``manifest.json``: every file with its shape and spacing, the simulation settings and, per held-out
  pair, the added noise (std of low - full inside the body), the flat-region noise of both images and the
  low dose's PSNR (``redcnn`` protocol).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Spacing, SpatialCrop

from ldct_clip.conventions import BODY_THRESHOLD_HU
from ldct_clip.data.phantom import make_phantom
from ldct_clip.errors import InputError
from ldct_clip.evaluation import flat_roi_noise, psnr, write_json
from ldct_clip.io import check_output_path, load_ct, save_nifti
from ldct_clip.io.staging import staged_output
from ldct_clip.simulation import DEFAULT_PHOTONS, simulate_low_dose

__all__ = [
    "DICOM_HELDOUT_SLICES",
    "DICOM_TRAIN_SLICES",
    "DICOM_TRAIN_SPACINGS_MM",
    "HELDOUT_PHANTOM",
    "NIFTI_SPACINGS_MM",
    "TRAIN_PHANTOMS",
    "heldout_noise",
    "prepare_demo_data",
]

DICOM_SERIES = "totalseg_example_ct_dicom"
NIFTI_VOLUME = "totalseg_example_ct.nii.gz"
#: Slice indices (in load_ct's order, inferior to superior) of the real series used for training...
DICOM_TRAIN_SLICES = range(0, 14)
#: ...and held out; 14 and 15 are the gap between them.
DICOM_HELDOUT_SLICES = range(16, 20)
#: In-plane pixel sizes (mm) the DICOM training slices are also resampled to (besides their own 0.977 mm).
DICOM_TRAIN_SPACINGS_MM = (0.75, 1.25)
#: In-plane pixel sizes (mm) the 3 mm NIfTI volume is resampled to (all slices at the first, every other at
#: the next ones).
NIFTI_SPACINGS_MM = (1.0, 0.75)
#: (size, slices, seed) of the training phantoms, 0.8 mm pixels, 3 mm slices.
TRAIN_PHANTOMS = (
    (512, 8, 1),
    (512, 8, 2),
    (384, 8, 3),
    (256, 8, 4),
    (448, 8, 5),
    (320, 8, 6),
    (512, 8, 7),
    (384, 8, 8),
)
#: (size, slices, seed) of the held-out phantom: a seed no training phantom (nor the demo, seed 0) uses.
HELDOUT_PHANTOM = (512, 4, 99)
PHANTOM_SPACING = (0.8, 0.8, 3.0)


def _crop_slices(volume, slices: range):
    """Slices ``slices`` of the last axis, with the affine moved accordingly (MONAI ``SpatialCrop``)."""
    if slices.start < 0 or slices.stop > volume.shape[-1]:
        raise InputError(
            f"slices {slices.start}-{slices.stop - 1} asked for, the series has {volume.shape[-1]}: "
            "give the full totalseg_example_ct_dicom series"
        )
    x, y = volume.shape[1:3]
    return SpatialCrop(roi_start=(0, 0, slices.start), roi_end=(x, y, slices.stop))(volume)


def _resample_in_plane(volume, spacing_mm: float, slice_step: int = 1):
    """``volume`` resampled in-plane to ``spacing_mm`` (bilinear), keeping every ``slice_step``-th slice (the
    new slice grid starts on the first slice, so the kept slices are not interpolated)."""
    z = float(np.linalg.norm(np.asarray(volume.affine)[:3, 2])) * slice_step
    # "border": the few voxels the new grid adds at the edge repeat the edge (air), not 0 HU
    return Spacing(pixdim=(spacing_mm, spacing_mm, z), mode="bilinear", padding_mode="border")(volume)


def _spacing_name(spacing_mm: float) -> str:
    """``0.75`` -> ``"0p75mm"``: a file name part without a second dot."""
    return f"{spacing_mm:g}".replace(".", "p") + "mm"


def heldout_noise(low, full) -> dict[str, float]:
    """What a held-out pair's simulated noise is: std (HU) of ``low - full`` inside the body, the noise std in
    the flattest normal-dose windows (``ldct_clip.evaluation.flat_roi_noise``) of both, and the low dose's PSNR (redcnn)."""
    low_np = np.asarray(low[0], dtype=np.float64)
    full_np = np.asarray(full[0], dtype=np.float64)
    body = full_np > BODY_THRESHOLD_HU
    added = float((low_np - full_np)[body].std())
    flat_low, flat_full = [], []
    for z in range(full_np.shape[-1]):
        _, noise = flat_roi_noise({"low": low_np[..., z], "full": full_np[..., z]}, full_np[..., z])
        flat_low.append(noise["low"])
        flat_full.append(noise["full"])
    slices = [torch.from_numpy(v).permute(2, 0, 1)[:, None] for v in (low_np, full_np)]
    return {
        "added_noise_std_body_hu": added,
        "noise_std_flat_low_hu": float(np.mean(flat_low)),
        "noise_std_flat_full_hu": float(np.mean(flat_full)),
        "psnr_low_redcnn_db": float(psnr(*slices, protocol="redcnn").mean()),
    }


def _describe(volume) -> dict:
    affine = np.asarray(volume.affine, dtype=np.float64)
    return {
        "shape": [int(s) for s in volume.shape[1:]],
        "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)],
    }


def prepare_demo_data(
    shared_data: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    dose: float = 0.25,
    seed: int = 0,
    nifti_spacing_mm: float | Sequence[float] = NIFTI_SPACINGS_MM,
    train_phantoms: Sequence[tuple[int, int, int]] = TRAIN_PHANTOMS,
    dicom_spacings_mm: Sequence[float] = DICOM_TRAIN_SPACINGS_MM,
    heldout_phantom: tuple[int, int, int] | None = HELDOUT_PHANTOM,
    workers: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Write the demo weights' training volumes and held-out pairs (see the module docstring).

    Args:
        shared_data: folder holding ``totalseg_example_ct_dicom/`` and ``totalseg_example_ct.nii.gz``.
        output_dir: folder to create (``train/``, ``heldout/``, ``manifest.json``); refused if it exists
            unless ``overwrite``.
        overwrite: replace an existing ``output_dir``.
        dose: dose fraction of the held-out low-dose volumes.
        seed: seed of the simulated noise.
        nifti_spacing_mm: in-plane pixel size(s) the 3 mm NIfTI volume is resampled to, one training volume
            each (every other slice after the first); 0 keeps 3 mm.
        train_phantoms: ``(size, slices, seed)`` of each training phantom.
        dicom_spacings_mm: in-plane pixel sizes the DICOM training slices are also resampled to.
        heldout_phantom: ``(size, slices, seed)`` of the held-out phantom pair; None for none.
        workers: simulation processes (default one per CPU).
        progress: progress bars for the simulation.
        log: called with one line per file written.

    Returns:
        the manifest (also written as ``manifest.json``).

    Raises:
        InputError: the shared data are missing or not as expected; a held-out phantom seed that a
            training phantom uses.
    """
    shared = Path(shared_data).expanduser()
    dicom_dir, nifti_path = shared / DICOM_SERIES, shared / NIFTI_VOLUME
    for needed in (dicom_dir, nifti_path):
        if not needed.exists():
            raise InputError(
                f"{needed} not found: give the folder holding {DICOM_SERIES}/ and {NIFTI_VOLUME}"
            )
    if heldout_phantom is not None and heldout_phantom[2] in {p[2] for p in train_phantoms}:
        raise InputError(
            f"held-out phantom seed {heldout_phantom[2]} is also a training seed: choose another"
        )
    final = check_output_path(shared, output_dir, overwrite)

    manifest: dict = {
        "source": str(shared.resolve()),
        "simulation": {"dose": dose, "photons": DEFAULT_PHOTONS, "seed": seed},
        "train": {},
        "heldout": {},
    }
    with staged_output(final, overwrite=overwrite, is_dir=True) as tmp:
        train, heldout = tmp / "train", tmp / "heldout"
        train.mkdir()
        heldout.mkdir()

        def write(volume, folder: Path, name: str, section: str, **extra) -> None:
            save_nifti(volume, folder / name)
            manifest[section][name] = {**_describe(volume), **extra}
            info = manifest[section][name]
            log(f"{folder.name}/{name}: {tuple(info['shape'])} voxels of {tuple(info['spacing_mm'])} mm")

        series = load_ct(dicom_dir)
        first, last = DICOM_TRAIN_SLICES, DICOM_HELDOUT_SLICES
        write(
            _crop_slices(series, first),
            train,
            "totalseg_dicom_train.nii.gz",
            "train",
            source=f"{DICOM_SERIES} slices {first.start}-{first.stop - 1}",
        )
        for spacing in dicom_spacings_mm:
            write(
                _resample_in_plane(_crop_slices(series, first), spacing),
                train,
                f"totalseg_dicom_train_{_spacing_name(spacing)}.nii.gz",
                "train",
                source=f"{DICOM_SERIES} slices {first.start}-{first.stop - 1} resampled in-plane to {spacing:g} mm",
            )
        volume = load_ct(nifti_path)
        spacings = nifti_spacing_mm if isinstance(nifti_spacing_mm, Sequence) else (nifti_spacing_mm,)
        for i, spacing in enumerate(spacings):
            step = 1 if i == 0 else 2
            resampled = _resample_in_plane(volume, spacing, step) if spacing else volume
            every = "" if step == 1 else ", every other slice"
            write(
                resampled,
                train,
                f"totalseg_ct_{_spacing_name(spacing)}.nii.gz" if spacing else "totalseg_ct.nii.gz",
                "train",
                source=f"{NIFTI_VOLUME}"
                + (f" resampled in-plane to {spacing:g} mm" if spacing else "")
                + every,
            )
        for size, slices, phantom_seed in train_phantoms:
            write(
                make_phantom(size, slices, PHANTOM_SPACING, phantom_seed),
                train,
                f"phantom_seed{phantom_seed}.nii.gz",
                "train",
                source=f"ldct_clip.data.phantom.make_phantom(size={size}, slices={slices}, seed={phantom_seed})",
            )

        pairs = [
            (
                "totalseg_dicom_heldout",
                _crop_slices(series, last),
                f"{DICOM_SERIES} slices {last.start}-{last.stop - 1}",
            )
        ]
        if heldout_phantom is not None:
            size, slices, phantom_seed = heldout_phantom
            pairs.append(
                (
                    f"phantom_seed{phantom_seed}",
                    make_phantom(size, slices, PHANTOM_SPACING, phantom_seed),
                    f"ldct_clip.data.phantom.make_phantom(size={size}, slices={slices}, seed={phantom_seed})",
                )
            )
        for name, full, source in pairs:
            low = simulate_low_dose(full, dose=dose, seed=seed, workers=workers, progress=progress).round()
            write(full, heldout, f"{name}_full.nii.gz", "heldout", source=source)
            write(
                low,
                heldout,
                f"{name}_low.nii.gz",
                "heldout",
                source=f"simulated dose {dose:g} of {name}_full",
            )
            stats = heldout_noise(low, full)
            manifest["heldout"][f"{name}_low.nii.gz"].update(stats)
            log(
                f"  {name}: dose {dose:g} adds {stats['added_noise_std_body_hu']:.1f} HU noise std in the body; "
                f"flat region {stats['noise_std_flat_full_hu']:.1f} -> {stats['noise_std_flat_low_hu']:.1f} HU; "
                f"PSNR (redcnn) of low dose {stats['psnr_low_redcnn_db']:.2f} dB"
            )
        write_json(manifest, tmp / "manifest.json")
    log(
        f"wrote {final} (train/: {len(manifest['train'])} volumes, heldout/: {len(pairs)} pairs, manifest.json)"
    )
    return manifest
