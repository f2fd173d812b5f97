"""CT data layouts on disk: finding the slices, volumes and low-/normal-dose pairs, and the patient split.

Layouts (:func:`detect_layout` tells the first two apart):

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
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ldct_clip.conventions import model_to_hu
from ldct_clip.errors import InputError
from ldct_clip.io import load_ct
from ldct_clip.io.dicom_series import is_dicom_file

__all__ = [
    "all_patients",
    "detect_layout",
    "find_mayo_npy",
    "find_pairs",
    "find_volumes",
    "load_pair_volumes",
    "split_patients",
]

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


def all_patients(data_dir: str | os.PathLike) -> list[str]:
    """Every patient id of a ``"mayo_npy"`` or ``"volumes"`` folder, sorted.

    Raises:
        InputError: no CT data in the folder.
    """
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


def load_pair_volumes(pair: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The (low, full) HU volumes (1, X, Y, Z) of a :func:`find_pairs` entry, and whether they are
    already in slice orientation (Mayo npy slices are: they are stored as the network saw them).

    Raises:
        InputError: the two volumes differ in shape.
    """
    if pair["kind"] == "mayo_npy":
        low = np.stack([np.load(p) for p in pair["low"]], axis=-1)[None].astype(np.float32)
        full = np.stack([np.load(p) for p in pair["full"]], axis=-1)[None].astype(np.float32)
        low_hu, full_hu = model_to_hu(torch.from_numpy(low)), model_to_hu(torch.from_numpy(full))
        oriented = True
    else:
        low_hu, full_hu, oriented = load_ct(pair["low"]), load_ct(pair["full"]), False
    if tuple(low_hu.shape) != tuple(full_hu.shape):
        raise InputError(
            f"patient {pair['patient']}: low-dose {tuple(low_hu.shape[1:])} and normal-dose "
            f"{tuple(full_hu.shape[1:])} volumes differ in size; give matching series"
        )
    return low_hu, full_hu, oriented
