"""DICOM series discovery, grouping, ordering and validation (headers only, no pixel data).

MONAI's PydicomReader and SimpleITK's series reader decode well but neither groups a mixed export by
SeriesInstanceUID with the checks and one-line messages users need (which series, which file, what is
wrong), so this module owns that part; pixel decoding stays with pydicom and its pylibjpeg plugins.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ldct_clip.errors import InputError

__all__ = [
    "DicomSeries",
    "SliceHeader",
    "find_ct_series",
    "find_dicom_series",
    "is_dicom_file",
    "lps_to_ras",
    "order_along_normal",
    "rescale_of",
    "read_header",
    "select_series",
    "sorted_series_geometry",
]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Slices closer than this along the normal are the same position (mm).
DUPLICATE_TOLERANCE_MM = 1e-3
# Orientation cosines differing by more than this are a different orientation.
ORIENTATION_TOLERANCE = 1e-4
# Relative deviation of one slice gap from the median that triggers the non-uniform spacing warning.
SPACING_TOLERANCE = 0.01

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """DICOM/ITK (LPS) affine to MONAI/NIfTI (RAS) affine and back (the flip is its own inverse)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


@dataclass
class SliceHeader:
    """What the loader and the writer need from one DICOM file's header."""

    path: Path
    dataset: Dataset

    @property
    def frames(self) -> int:
        return int(self.dataset.get("NumberOfFrames", 1) or 1)

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1 or "PerFrameFunctionalGroupsSequence" in self.dataset


@dataclass
class DicomSeries:
    """A group of DICOM image files sharing one SeriesInstanceUID."""

    uid: str
    description: str
    modality: str
    path: Path
    headers: list[SliceHeader] = field(default_factory=list, repr=False)

    @property
    def n_slices(self) -> int:
        return sum(h.frames for h in self.headers)

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]

    @property
    def is_localizer(self) -> bool:
        image_type = [str(v).upper() for v in self.headers[0].dataset.get("ImageType", [])]
        return "LOCALIZER" in image_type

    def summary(self) -> str:
        return f"{self.uid or '<no SeriesInstanceUID>'} ('{self.description}', {self.modality}, {self.n_slices} slices)"


def is_dicom_file(path: Path) -> bool:
    """Part-10 files carry 'DICM' after a 128-byte preamble; anything else in a folder is not ours to read."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path) -> Dataset:
    """Read a header without pixel data; an unreadable file raises InputError naming it."""
    try:
        # Deferred rather than stop_before_pixels: the pixel data element must be seen (not loaded) to tell
        # a complete image from one whose header was cut short, which pydicom reads without complaint.
        return pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"cannot read DICOM file {path}: {e}; the file is truncated or corrupt, remove it or export the series again"
        ) from e


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _is_image(ds: Dataset) -> bool:
    """Image objects (to load or to report as broken); SR, RT structures, DICOMDIR... are skipped."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class and "file_meta" in ds.__dict__:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if sop_class == DICOMDIR_SOP_CLASS:
        return False
    return "Rows" in ds or "Image Storage" in UID(sop_class).name


def _iter_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def find_dicom_series(root: str | os.PathLike) -> list[DicomSeries]:
    """All image series under ``root`` (a folder searched recursively, or one file), grouped by SeriesInstanceUID.

    Files without the DICOM preamble, DICOMDIR files and objects without pixel data (SR, RT structures,
    presentation states) are skipped.
    """
    root = Path(root)
    files = [root] if root.is_file() else list(_iter_files(root))
    groups: dict[str, DicomSeries] = {}
    for path in files:
        if not is_dicom_file(path):
            continue
        ds = read_header(path)
        if not _is_image(ds):
            continue
        if "Rows" not in ds or not any(k in ds for k in PIXEL_KEYWORDS):
            raise InputError(
                f"cannot read DICOM file {path}: the header ends before the pixel data; the file is truncated "
                "or corrupt, remove it or export the series again"
            )
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid not in groups:
            groups[uid] = DicomSeries(
                uid=uid,
                description=str(ds.get("SeriesDescription", "")),
                modality=str(ds.get("Modality", "")),
                path=path.parent if root.is_dir() else path,
            )
        groups[uid].headers.append(SliceHeader(path, ds))
    return list(groups.values())


def find_ct_series(
    root: str | os.PathLike, modalities: tuple[str, ...] | None = ("CT",)
) -> list[DicomSeries]:
    """CT series under ``root``; each has ``uid``, ``description``, ``n_slices``, ``path`` and ``files``.

    Args:
        root: folder (searched recursively) or a single DICOM file.
        modalities: keep series of these modalities; ``None`` keeps every image series.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    return [s for s in find_dicom_series(root) if modalities is None or s.modality in modalities]


def _list(series: list[DicomSeries]) -> str:
    return "; ".join(s.summary() for s in series)


def select_series(
    root: str | os.PathLike, series_uid: str | None = None, allow_non_ct: bool = False
) -> DicomSeries:
    """Pick the one series to load from ``root``, with a message that lists the choices when it is ambiguous."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    if root.is_dir() and not any(p.is_file() for p in _iter_files(root)):
        raise InputError(f"folder {root} is empty; point to the folder holding the DICOM series")
    found = find_dicom_series(root)
    if not found:
        raise InputError(
            f"no DICOM images found in {root}; point to a DICOM series folder, a NIfTI or .mha/.nrrd file"
        )
    if series_uid is not None:
        match = [s for s in found if s.uid == series_uid]
        if not match:
            raise InputError(f"series_uid {series_uid} not found in {root}; available: {_list(found)}")
        chosen = match[0]
    else:
        candidates = found if allow_non_ct else [s for s in found if s.modality == "CT"]
        if not candidates:
            raise InputError(
                f"{root} holds no CT images (Modality {', '.join(sorted({s.modality or '<none>' for s in found}))}); "
                "pass allow_non_ct=True (CLI: --allow-non-ct) to load non-CT images"
            )
        if len(candidates) > 1:
            # A scout/localizer next to the axial series is the usual export; it is never what is wanted.
            axial = [s for s in candidates if not s.is_localizer]
            candidates = axial or candidates
        if len(candidates) > 1:
            raise InputError(
                f"{root} holds {len(candidates)} series; choose one with series_uid (CLI: --series-uid): "
                f"{_list(candidates)}"
            )
        chosen = candidates[0]
    if chosen.modality != "CT" and not allow_non_ct:
        raise InputError(
            f"series {chosen.uid} is not CT (Modality {chosen.modality or '<none>'}); "
            "pass allow_non_ct=True (CLI: --allow-non-ct) to load it anyway"
        )
    return chosen


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{keyword} in {path} is not numeric ({value!r}); the file is corrupt") from e
    if arr.size != n:
        raise InputError(f"{keyword} in {path} has {arr.size} values instead of {n}; the file is corrupt")
    return arr


def rescale_of(ds: Dataset, path: Path, required: bool) -> tuple[float, float]:
    """(slope, intercept) of a classic image; CT requires both, other modalities default to identity."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        if required:
            missing = "/".join(
                k for k, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)) if v in (None, "")
            )
            raise InputError(
                f"{path} lacks {missing}, so stored values cannot be converted to HU; export the series again with rescale tags"
            )
        return 1.0, 0.0
    return float(slope), float(intercept)


def order_along_normal(
    positions: np.ndarray, normal: np.ndarray, labels: list[str], what: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Order slices by position along the slice normal (not InstanceNumber); check duplicates and spacing.

    Returns:
        the ordering and the mean step vector between consecutive slices (``None`` for one slice). The
        mean step rather than ``normal * spacing`` keeps gantry-tilted (sheared) stacks exact.
    """
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    if len(order) < 2:
        return order, None
    distance = distance[order]
    gaps = np.diff(distance)
    dup = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        a, b = labels[order[dup[0]]], labels[order[dup[0] + 1]]
        raise InputError(
            f"duplicate slice position {distance[dup[0]]:.3f} mm in {what} ({a} and {b}); "
            "remove the duplicates or load one acquisition at a time"
        )
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median)
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_TOLERANCE * median:
        warnings.warn(
            f"non-uniform slice spacing in {what}: median {median:.4g} mm, largest deviation "
            f"{deviation[worst]:.4g} mm (gap {gaps[worst]:.4g} mm between {labels[order[worst]]} and "
            f"{labels[order[worst + 1]]}); the volume uses the mean spacing",
            UserWarning,
            stacklevel=3,
        )
    return order, (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)


@dataclass
class SeriesGeometry:
    """Ordered slices and the affine of a validated classic (one frame per file) series."""

    headers: list[SliceHeader]
    affine_lps: np.ndarray
    rows: int
    columns: int
    positions: np.ndarray  # (n, 3) ImagePositionPatient of the ordered slices

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, len(self.headers))


def sorted_series_geometry(series: DicomSeries) -> SeriesGeometry:
    """Validate a classic series and order its slices along the slice normal.

    Raises InputError for changing rows/columns/orientation, multi-channel pixels, missing geometry and
    duplicate positions; warns (``UserWarning``) on non-uniform spacing with the largest deviation.
    """
    headers = series.headers
    first = headers[0]
    if any(h.is_multiframe for h in headers):
        if len(headers) == 1:
            raise InputError(f"{first.path} is a multi-frame file; load the file itself, not its folder")
        raise InputError(
            f"series {series.uid} mixes {len(headers)} multi-frame files; load each file on its own"
        )
    rows, cols = int(first.dataset.Rows), int(first.dataset.Columns)
    for h in headers:
        spp = int(h.dataset.get("SamplesPerPixel", 1) or 1)
        if spp != 1:
            raise InputError(
                f"{h.path} has {spp} samples per pixel (colour/multi-channel); CT volumes need one channel"
            )
        if (int(h.dataset.Rows), int(h.dataset.Columns)) != (rows, cols):
            raise InputError(
                f"rows/columns change inside series {series.uid}: {rows}x{cols} in {first.path.name}, "
                f"{int(h.dataset.Rows)}x{int(h.dataset.Columns)} in {h.path.name}; keep one image size per series"
            )

    iop0 = _floats(first.dataset, "ImageOrientationPatient", 6, first.path)
    ps0 = _floats(first.dataset, "PixelSpacing", 2, first.path)
    if len(headers) == 1 and (iop0 is None or ps0 is None):
        # A lone secondary-capture style image: no patient geometry, keep pixels at 1 mm, axial.
        warnings.warn(
            f"{first.path} has no image plane geometry; assuming 1 mm pixels, axial orientation", stacklevel=3
        )
        iop0 = iop0 if iop0 is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        ps0 = ps0 if ps0 is not None else np.array([1.0, 1.0])
    if iop0 is None:
        raise InputError(f"{first.path} lacks ImageOrientationPatient; cannot build the volume geometry")
    if ps0 is None:
        raise InputError(f"{first.path} lacks PixelSpacing; cannot build the volume geometry")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)

    positions = []
    for h in headers:
        iop = _floats(h.dataset, "ImageOrientationPatient", 6, h.path)
        if iop is not None and np.abs(iop - iop0).max() > ORIENTATION_TOLERANCE:
            raise InputError(
                f"image orientation changes inside series {series.uid} ({first.path.name} vs {h.path.name}); "
                "the folder mixes acquisitions, load one orientation at a time"
            )
        ps = _floats(h.dataset, "PixelSpacing", 2, h.path)
        if ps is not None and np.abs(ps - ps0).max() > 1e-4:
            raise InputError(
                f"pixel spacing changes inside series {series.uid} ({first.path.name} vs {h.path.name}); "
                "keep one pixel spacing per series"
            )
        ipp = _floats(h.dataset, "ImagePositionPatient", 3, h.path)
        if ipp is None:
            if len(headers) > 1:
                raise InputError(
                    f"{h.path} lacks ImagePositionPatient; cannot order the slices of series {series.uid}"
                )
            ipp = np.zeros(3)
        positions.append(ipp)
    order, step = order_along_normal(
        np.asarray(positions), normal, [h.path.name for h in headers], f"series {series.uid}"
    )
    headers = [headers[i] for i in order]
    positions = np.asarray(positions)[order]
    if len(headers) == 1:
        ds = first.dataset
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        step = normal * float(thickness)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]  # along a row = increasing column index, column spacing
    affine[:3, 1] = col_dir * ps0[0]  # down a column = increasing row index, row spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return SeriesGeometry(headers=headers, affine_lps=affine, rows=rows, columns=cols, positions=positions)
