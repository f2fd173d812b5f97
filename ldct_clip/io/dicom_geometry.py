"""Geometry of a classic DICOM series: slices ordered along their normal, checked, and the volume's affine.

Ordering is by position along the slice normal (not InstanceNumber); duplicates, changing sizes or
orientations are refused with one line naming the files, non-uniform spacing is warned about.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from ldct_clip.errors import InputError

if TYPE_CHECKING:
    from ldct_clip.io.dicom_series import DicomSeries, SliceHeader

__all__ = [
    "SeriesGeometry",
    "lps_to_ras",
    "order_along_normal",
    "rescale_of",
    "sorted_series_geometry",
]

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
