"""Shared helpers of the CT I/O tests: real DICOM test files, input snapshots, dciodvfy."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SMALL = 32  # phantom matrix for fast tests
SLICES = 5


def dicom_test_file(name: str) -> Path:
    """A file of pydicom's test set or of the pydicom-data package (the [test] extra); skip if absent."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except TypeError:  # older pydicom without the download switch
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed (pip install pydicom-data)")
    return Path(path)


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    digests = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines starting with 'Error' that dciodvfy (dicom3tools) reports on one file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools); CI installs it")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def sitk_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume (X, Y, Z), RAS affine) of a DICOM folder read by SimpleITK's (GDCM's) series reader."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image).T.astype(np.float64), sitk_affine(image)


def sitk_affine(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
