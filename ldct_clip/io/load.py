"""``load_ct``: any CT volume a user has (DICOM folder or file, enhanced multi-frame, NIfTI, .mha/.nrrd) in HU.

The result is always a MONAI ``MetaTensor`` of shape ``(1, X, Y, Z)``, float32 Hounsfield units, with
the affine in MONAI's RAS convention and metadata (``source_path``, ``source_kind``, ``series_uid``...)
that the writers use to find their way back to the source. The format is decided by the file's content
(DICOM preamble, NIfTI magic, MetaImage / NRRD header), not by its name.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import re
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from pydicom.dataset import Dataset
from tqdm.auto import tqdm

from ldct_clip.errors import InputError
from ldct_clip.io.dicom_series import (
    DicomSeries,
    SliceHeader,
    decode_pixels,
    lps_to_ras,
    order_along_normal,
    read_header,
    rescale_of,
    select_series,
    sorted_series_geometry,
)
from ldct_clip.io.monai_loader import quiet_load_image

__all__ = ["NIFTI_SUFFIXES", "ITK_SUFFIXES", "load_ct", "nifti_shape", "sniff_format"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_GZIP_MAGIC = b"\x1f\x8b"
_METAIMAGE_KEY = re.compile(rb"\s*(ObjectType|NDims|DimSize|ElementType|HeaderSize)\s*=")


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _nifti_version(head: bytes) -> int | None:
    """1 or 2 when ``head`` starts a NIfTI-1/NIfTI-2 header (either byte order), else None."""
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1") and 348 in sizes:
        return 1
    if len(head) >= 8 and head[4:7] in (b"n+2", b"ni2") and 540 in sizes:
        return 2
    return None


def sniff_format(path: str | os.PathLike) -> str | None:
    """What a file holds, from its first bytes: ``"dicom"``, ``"nifti"`` (also gzipped), ``"itk"``
    (MetaImage or NRRD header), or ``None`` when none of those. A folder is ``"dicom"``."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
        if head[:2] == _GZIP_MAGIC:
            with gzip.open(path, "rb") as f:
                head = f.read(544)
    except (OSError, EOFError, zlib.error):
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    if _nifti_version(head) is not None:
        return "nifti"
    if head.startswith(b"NRRD000") or _METAIMAGE_KEY.match(head):
        return "itk"
    return None


def load_ct(
    path: str | os.PathLike | DicomSeries,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    include_derived: bool | None = None,
    progress: bool = True,
) -> MetaTensor:
    """Load a CT volume in Hounsfield units.

    Args:
        path: a folder of DICOM files (searched recursively, grouped by SeriesInstanceUID), a single DICOM
            file (classic or enhanced multi-frame), a NIfTI file or an ITK file (MetaImage, NRRD), told apart
            by content; or a :class:`~ldct_clip.io.dicom_series.DicomSeries` already found (its headers are
            not read again).
        series_uid: which series to load when the folder holds several CT series.
        allow_non_ct: accept DICOM images whose Modality is not CT (MR, ...): values are then the
            modality's rescaled values (identity when it has no rescale), not HU.
        include_derived: consider series that ldct-clip itself denoised: ``True`` like any other, ``False``
            never (a folder holding only such series is an error), ``None`` (default) only where a folder
            holds nothing else, so that an output reads back but a folder of inputs and outputs gives the input.
        progress: a progress bar while a long series (64 slices or more) is decoded.

    Returns:
        ``MetaTensor`` ``(1, X, Y, Z)`` float32 with a RAS affine. For DICOM, X follows the image columns,
        Y the rows and Z increases along the slice normal (slices ordered by position, not InstanceNumber).
        ``meta["skipped"]`` says what a folder scan left out (non-image objects...), "" when nothing.

    Raises:
        InputError: with one line saying what is wrong with the input and how to fix it.
    """
    if isinstance(path, DicomSeries):
        return _load_series(path, path.path, allow_non_ct, progress)
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if path.is_dir():
        return _load_series(
            select_series(path, series_uid, allow_non_ct, include_derived), path, allow_non_ct, progress
        )
    kind = sniff_format(path)
    if kind is None:
        # Content not recognised: a NIfTI or ITK name still picks the reader, whose error says what is wrong.
        if _has_suffix(path, NIFTI_SUFFIXES):
            kind = "nifti"
        elif _has_suffix(path, ITK_SUFFIXES):
            kind = "itk"
    if kind == "nifti":
        return _load_nifti(path)
    if kind == "itk":
        return _load_itk(path)
    if kind == "dicom":
        header = SliceHeader(path, read_header(path))
        if series_uid is not None and str(header.dataset.get("SeriesInstanceUID", "")) != series_uid:
            raise InputError(
                f"{path} belongs to series {header.dataset.get('SeriesInstanceUID')}, not {series_uid}"
            )
        series = select_series(path, None, allow_non_ct, include_derived=True)
        return _load_series(series, path, allow_non_ct, progress)
    raise InputError(
        f"{path} is neither DICOM (no 'DICM' preamble) nor NIfTI nor ITK (MetaImage .mha/.mhd, NRRD); "
        "convert it to one of those"
    )


def _load_series(series: DicomSeries, source: Path, allow_non_ct: bool, progress: bool = True) -> MetaTensor:
    if series.modality != "CT" and not allow_non_ct and not series.headers[0].is_multiframe:
        raise InputError(
            f"series {series.uid} is not CT (Modality {series.modality or '<none>'}); ldct-clip denoises CT only "
            "(from Python, load_ct(..., allow_non_ct=True) reads other modalities)"
        )
    if len(series.headers) == 1 and series.headers[0].is_multiframe:
        volume = _load_multiframe(series.headers[0], source, allow_non_ct)
    else:
        volume = _load_classic_series(series, source, progress)
    volume.meta["skipped"] = series.skipped
    return volume


def _finish(volume: np.ndarray, affine_lps: np.ndarray, source: Path, kind: str, meta: dict) -> MetaTensor:
    # the sum is finite exactly when every voxel is (HU sums cannot overflow float64): no volume-sized mask
    if not np.isfinite(volume.sum(dtype=np.float64)):
        bad = int((~np.isfinite(volume)).sum())
        raise InputError(f"{source} contains {bad} NaN/Inf voxels; fix or re-export the volume")
    affine = lps_to_ras(affine_lps)
    meta = {
        "filename_or_obj": str(source),
        "source_path": str(source.resolve()),
        "source_kind": kind,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(volume.shape),
        "space": "RAS",
        "original_channel_dim": "no_channel",
        **meta,
    }
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)[None])
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def _dicom_meta(series_ds: Dataset, n: int) -> dict:
    return {
        "series_uid": str(series_ds.get("SeriesInstanceUID", "")),
        "study_uid": str(series_ds.get("StudyInstanceUID", "")),
        "series_description": str(series_ds.get("SeriesDescription", "")),
        "modality": str(series_ds.get("Modality", "")),
        "n_slices": n,
    }


def _load_classic_series(series: DicomSeries, source: Path, progress: bool = True) -> MetaTensor:
    geometry = sorted_series_geometry(series)
    n = len(geometry.headers)
    volume = np.empty(geometry.shape, dtype=np.float32)
    require_rescale = series.modality == "CT"
    for k, header in enumerate(
        tqdm(geometry.headers, desc="reading DICOM", unit="slice", disable=n < 64 or not progress)
    ):
        slope, intercept = rescale_of(header.dataset, header.path, require_rescale)
        pixels = decode_pixels(header)
        if pixels.shape != (geometry.rows, geometry.columns):
            raise InputError(
                f"{header.path} decodes to shape {pixels.shape}, expected ({geometry.rows}, {geometry.columns}); "
                "the file is corrupt or multi-channel"
            )
        volume[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return _finish(volume, geometry.affine_lps, source, "dicom", _dicom_meta(geometry.headers[0].dataset, n))


def _frame_item(ds: Dataset, index: int, sequence: str):
    """The functional group ``sequence`` of frame ``index``: per-frame if present there, else shared."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        group = groups[index] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        if sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _load_multiframe(header: SliceHeader, source: Path, allow_non_ct: bool) -> MetaTensor:
    """Enhanced (multi-frame) CT: geometry and rescale live in the per-frame/shared functional groups."""
    ds, path = header.dataset, header.path
    if str(ds.get("Modality", "")) != "CT" and not allow_non_ct:
        raise InputError(
            f"{path} is not CT (Modality {ds.get('Modality')}); pass allow_non_ct=True to load it anyway"
        )
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise InputError(
            f"{path} has {spp} samples per pixel (colour/multi-channel); CT volumes need one channel"
        )
    frames = header.frames
    pixels = decode_pixels(header).reshape(frames, int(ds.Rows), int(ds.Columns))
    positions, slopes, intercepts = [], [], []
    iop0 = spacing = None
    thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    has_geometry = all(
        _frame_item(ds, i, name) is not None
        for i in range(frames)
        for name in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PlanePositionSequence")
    )
    if not has_geometry:
        # Stripped or non-conformant files: keep the frames in file order at 1 mm rather than refuse them.
        warnings.warn(
            f"{path} has no per-frame plane geometry; stacking frames in file order, 1 mm pixels, axial",
            UserWarning,
            stacklevel=3,
        )
    for i in range(frames):
        if has_geometry:
            orient = _frame_item(ds, i, "PlaneOrientationSequence")
            measures = _frame_item(ds, i, "PixelMeasuresSequence")
            iop = np.asarray([float(v) for v in orient.ImageOrientationPatient])
            position = [float(v) for v in _frame_item(ds, i, "PlanePositionSequence").ImagePositionPatient]
        else:
            measures = None
            iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
            position = [0.0, 0.0, i * thickness]
        if iop0 is None:
            iop0 = iop
            spacing = (
                np.asarray([float(v) for v in measures.PixelSpacing]) if measures is not None else np.ones(2)
            )
            if measures is not None and measures.get("SliceThickness"):
                thickness = float(measures.SliceThickness)
        elif np.abs(iop - iop0).max() > 1e-4:
            raise InputError(
                f"image orientation changes between frames of {path}; load one orientation at a time"
            )
        positions.append(position)
        transform = _frame_item(ds, i, "PixelValueTransformationSequence")
        source_ds = transform if transform is not None else ds
        slope, intercept = rescale_of(source_ds, path, required=str(ds.get("Modality", "")) == "CT")
        slopes.append(slope)
        intercepts.append(intercept)
    positions = np.asarray(positions)
    normal = np.cross(iop0[:3], iop0[3:])
    order, step = order_along_normal(positions, normal, [f"frame {i + 1}" for i in range(frames)], str(path))
    if step is None:
        step = normal * thickness
    volume = np.empty((int(ds.Columns), int(ds.Rows), frames), dtype=np.float32)
    for k, i in enumerate(order):
        volume[:, :, k] = (pixels[i].astype(np.float64) * slopes[i] + intercepts[i]).T
    affine = np.eye(4)
    affine[:3, 0] = iop0[:3] * spacing[1]
    affine[:3, 1] = iop0[3:] * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[order[0]]
    return _finish(volume, affine, source, "dicom", {**_dicom_meta(ds, frames), "multiframe": True})


def _check_dims(shape: tuple[int, ...], path: Path) -> None:
    if len(shape) > 3:
        raise InputError(
            f"{path} is {len(shape)}-D (shape {tuple(shape)}); load_ct takes one 3-D single-channel volume, "
            "split the time points/channels first"
        )
    if len(shape) < 2:
        raise InputError(f"{path} has shape {tuple(shape)}; expected a 3-D volume")


@functools.cache
def _nifti_loader():
    return quiet_load_image(NibabelReader(), image_only=True, dtype=np.float32)


def nifti_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The data shape of a NIfTI file from its header alone, whatever the file is called.

    Raises:
        InputError: the header cannot be read.
    """
    path = Path(path)
    try:
        if _has_suffix(path, NIFTI_SUFFIXES):
            return tuple(int(s) for s in nib.load(str(path)).shape)
        with _open_misnamed_nifti(path) as (f, version):
            header_class = nib.Nifti2Header if version == 2 else nib.Nifti1Header
            return tuple(int(s) for s in header_class.from_fileobj(f).get_data_shape())
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise InputError(
            f"cannot read the NIfTI header of {path} ({e}); the file is truncated or corrupt"
        ) from e


@contextlib.contextmanager
def _open_misnamed_nifti(path: Path):
    """``(file object at offset 0, NIfTI version)`` of a NIfTI file, gzipped or not, whatever its name.

    MONAI's NibabelReader opens files through ``nib.load``, which picks the format by the file name and
    refuses any other suffix; nibabel's header and file-map interfaces read the same file from its content.
    """
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
        version = _nifti_version(f.read(544))
        f.seek(0)
        yield f, version


def _read_misnamed_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 voxels, affine) of a NIfTI file whose name does not end in .nii/.nii.gz."""
    with _open_misnamed_nifti(path) as (f, version):
        image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
        holder = nib.FileHolder(filename=str(path), fileobj=f)
        image = image_class.from_file_map({"header": holder, "image": holder})
        return np.asanyarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


def _load_nifti(path: Path) -> MetaTensor:
    try:
        if _has_suffix(path, NIFTI_SUFFIXES):
            img = _nifti_loader()(str(path))
            voxels, affine_ras = img.numpy(), np.asarray(img.affine, dtype=np.float64)
        else:
            voxels, affine_ras = _read_misnamed_nifti(path)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors...
        raise InputError(f"cannot read NIfTI file {path}: {e}; the file is truncated or corrupt") from e
    shape = tuple(voxels.shape)
    # NIfTI stores singleton trailing dimensions (e.g. X, Y, Z, 1); only real extra dimensions are an error.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    _check_dims(shape, path)
    array = voxels.reshape(shape)
    if array.ndim == 2:
        array = array[..., None]
    return _finish(array, lps_to_ras(affine_ras), path, "nifti", {})


def _load_itk(path: Path) -> MetaTensor:
    # SimpleITK rather than MONAI's ITKReader: the latter needs the separate, heavy `itk` package.
    # imported here: ~100 MB of resident memory that DICOM and NIfTI volumes never need (benchmarks/README.md)
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if not _has_suffix(path, ITK_SUFFIXES):
            # ITK picks its reader by suffix; a misnamed file gets the one its header names.
            with open(path, "rb") as f:
                reader.SetImageIO("NrrdImageIO" if f.read(7) == b"NRRD000" else "MetaImageIO")
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(
            f"cannot read {path}: {str(e).strip().splitlines()[-1]}; the file is truncated or corrupt"
        ) from e
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel (multi-channel); "
            "CT volumes need one channel"
        )
    _check_dims(tuple(img.GetSize()), path)
    array = sitk.GetArrayFromImage(img).astype(np.float32).T  # ITK arrays are (z, y, x)
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(img.GetSpacing())
    affine[:dim, 3] = img.GetOrigin()
    if array.ndim == 2:
        array = array[..., None]
    return _finish(array, affine, path, "itk", {})
