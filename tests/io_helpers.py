"""Shared helpers of the CT I/O tests: real DICOM test files, input snapshots, dciodvfy."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ldct_clip.io import staging
from ldct_clip.io.staging import FAULT_ENV

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


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder, sorted (an ldct-clip output also holds its manifest)."""
    return sorted(folder.glob("*.dcm"))


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


def killed_write(fault: str, write) -> int:
    """Run ``write`` in a forked child with ``LDCT_CLIP_FAULT=fault``; the child's exit code (-9: SIGKILLed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ[FAULT_ENV] = fault
            staging._fault_hits.clear()
            write()
        finally:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def as_nobody(function) -> str:
    """Run ``function`` in a child process as user nobody; the message it raised (or "" if none)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            function()
        except Exception as error:
            message = str(error)
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return f.read()


def non_image_object(path: Path, sop_class: str, modality: str, **elements) -> None:
    """A DICOM object without pixel data (SR, spectroscopy, presentation state...) of ``sop_class``."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), modality
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        sop_class,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
