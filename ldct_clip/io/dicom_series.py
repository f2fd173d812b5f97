"""DICOM series discovery, grouping, ordering and validation (headers only; pixels decoded from those headers).

MONAI's PydicomReader and SimpleITK's series reader decode well but neither groups a mixed export by
SeriesInstanceUID with the checks and one-line messages users need (which series, which file, what is
wrong, what was skipped and why), so this module owns that part; pixel decoding stays with pydicom and its
pylibjpeg plugins. Each header is read once: :func:`decode_pixels` reads a slice's pixel data from the
header already read, without parsing it again. Slice order and the affine: :mod:`ldct_clip.io.dicom_geometry`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_deferred_data_element
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from ldct_clip.errors import InputError
from ldct_clip.io.dicom_geometry import (
    SeriesGeometry,
    lps_to_ras,
    order_along_normal,
    rescale_of,
    sorted_series_geometry,
)
from ldct_clip.io.provenance import is_denoising_contribution
from ldct_clip.io.staging import is_staging_name

__all__ = [
    "DicomScan",
    "DicomSeries",
    "SeriesGeometry",
    "SkippedFile",
    "SliceHeader",
    "decode_pixels",
    "find_ct_series",
    "find_dicom_series",
    "is_dicom_file",
    "lps_to_ras",
    "order_along_normal",
    "rescale_of",
    "read_header",
    "scan_dicom",
    "select_series",
    "sorted_series_geometry",
]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: The flag of the commands that read series ldct-clip itself denoised (skipped otherwise).
INCLUDE_DERIVED_FLAG = "--include-derived"


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
    """A group of DICOM image files sharing one SeriesInstanceUID.

    ``skipped`` says, in one line, what the scan that found the series left out next to it (non-image
    objects, series ldct-clip denoised, unfinished ldct-clip outputs); empty when nothing was.
    """

    uid: str
    description: str
    modality: str
    path: Path
    headers: list[SliceHeader] = field(default_factory=list, repr=False)
    skipped: str = field(default="", repr=False)

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

    @property
    def is_denoised_by_ldct_clip(self) -> bool:
        return is_denoising_contribution(self.headers[0].dataset)

    def summary(self) -> str:
        return f"{self.uid or '<no SeriesInstanceUID>'} ('{self.description}', {self.modality}, {self.n_slices} slices)"


@dataclass
class SkippedFile:
    """A DICOM file a scan left out, and why (its object type, e.g. "Comprehensive SR")."""

    path: Path
    reason: str


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


@dataclass
class DicomScan:
    """What a scan of a folder found: the image series, and what it left out and why.

    Attributes:
        root: the folder or file scanned.
        series: the image series to choose from.
        derived: series ldct-clip itself denoised, left out unless asked for (``include_derived``).
        skipped: non-image DICOM objects (SR, spectroscopy, presentation states, RT structures, DICOMDIR...).
        staging: unfinished ldct-clip outputs (staging entries of interrupted runs), never read.
    """

    root: Path
    series: list[DicomSeries] = field(default_factory=list)
    derived: list[DicomSeries] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    staging: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the user, e.g. "skipped 2 non-image DICOM objects (1 Comprehensive SR, 1 Grayscale
        Softcopy Presentation State)"; empty when nothing was skipped."""
        parts = []
        if self.skipped:
            counts = Counter(s.reason for s in self.skipped)
            kinds = ", ".join(
                f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda c: (-c[1], c[0]))
            )
            parts.append(f"skipped {_plural(len(self.skipped), 'non-image DICOM object')} ({kinds})")
        if self.derived:
            names = ", ".join(f"'{s.description}'" for s in self.derived[:3])
            parts.append(
                f"skipped {_plural(len(self.derived), 'series', 'series')} ldct-clip denoised ({names}; "
                f"pass {INCLUDE_DERIVED_FLAG} to read them)"
            )
        if self.staging:
            parts.append(
                f"skipped {_plural(len(self.staging), 'unfinished ldct-clip output')} of interrupted runs "
                f"({self.staging[0].name}{', ...' if len(self.staging) > 1 else ''})"
            )
        return "; ".join(parts)


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
        # a complete image from one whose header was cut short, which pydicom reads without complaint; and
        # decode_pixels reads the pixels later from the deferred element without parsing the header again.
        return pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"cannot read DICOM file {path}: {e}; the file is truncated or corrupt, remove it or export the series again"
        ) from e


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _sop_class(ds: Dataset) -> str:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class and "file_meta" in ds.__dict__:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop_class


def _object_kind(sop_class: str) -> str:
    """A readable name of a SOP class: "Comprehensive SR", "MR Spectroscopy", "DICOMDIR"."""
    if sop_class == DICOMDIR_SOP_CLASS:
        return "DICOMDIR"
    if not sop_class:
        return "object without SOP class"
    name = UID(sop_class).name
    if name == sop_class:
        return f"SOP class {sop_class}"
    return name.removesuffix(" Storage")


def _classify(ds: Dataset) -> str | None:
    """None for an image (to load or to report as broken), else the kind of non-image object it is.

    Objects without pixel data are skipped unless their SOP class is an image storage class (or, having
    no SOP class, they carry Rows): those are images cut short, which are errors. MR spectroscopy carries
    Rows and Columns but is not an image.
    """
    if any(k in ds for k in PIXEL_KEYWORDS):
        return None
    sop_class = _sop_class(ds)
    if sop_class == DICOMDIR_SOP_CLASS:
        return _object_kind(sop_class)
    if "Image Storage" in UID(sop_class).name or (not sop_class and "Rows" in ds):
        return None
    return _object_kind(sop_class)


def _iter_files(root: Path, staging: list[Path] | None = None):
    """Files under ``root`` in a stable order; staging entries of ldct-clip runs are never entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            if is_staging_name(name):
                if staging is not None:
                    staging.append(here / name)
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if is_staging_name(name):
                if staging is not None:
                    staging.append(here / name)
                continue
            yield here / name


def scan_dicom(root: str | os.PathLike, include_derived: bool = False) -> DicomScan:
    """Read every DICOM header under ``root`` once and sort what was found.

    Args:
        root: a folder (searched recursively) or one file.
        include_derived: keep series that ldct-clip itself denoised among the series (left out by default,
            so that a folder of inputs and outputs is not denoised twice). Series ldct-clip simulated are
            inputs and always kept.

    Returns:
        a :class:`DicomScan`. Files without the DICOM preamble are ignored; non-image objects and
        unfinished ldct-clip outputs are listed as skipped.

    Raises:
        InputError: a DICOM file that cannot be read, or an image whose header ends before its pixel data.
    """
    root = Path(root)
    scan = DicomScan(root=root)
    files = [root] if root.is_file() else list(_iter_files(root, scan.staging))
    groups: dict[str, DicomSeries] = {}
    for path in files:
        if not is_dicom_file(path):
            continue
        ds = read_header(path)
        kind = _classify(ds)
        if kind is not None:
            scan.skipped.append(SkippedFile(path, kind))
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
    for series in groups.values():
        if series.is_denoised_by_ldct_clip and not include_derived:
            scan.derived.append(series)
        else:
            scan.series.append(series)
    summary = scan.summary()
    for series in scan.series + scan.derived:
        series.skipped = summary
    return scan


def find_dicom_series(root: str | os.PathLike, include_derived: bool = False) -> list[DicomSeries]:
    """All image series under ``root`` (a folder searched recursively, or one file), grouped by SeriesInstanceUID.

    Files without the DICOM preamble, non-image objects (SR, RT structures, presentation states, DICOMDIR),
    unfinished ldct-clip outputs and, unless ``include_derived``, series ldct-clip denoised are left out
    (:func:`scan_dicom` says which and why).
    """
    return scan_dicom(root, include_derived).series


def find_ct_series(
    root: str | os.PathLike, modalities: tuple[str, ...] | None = ("CT",), include_derived: bool = False
) -> list[DicomSeries]:
    """CT series under ``root``; each has ``uid``, ``description``, ``n_slices``, ``path`` and ``files``.

    Args:
        root: folder (searched recursively) or a single DICOM file.
        modalities: keep series of these modalities; ``None`` keeps every image series.
        include_derived: keep series ldct-clip itself denoised (see :func:`scan_dicom`).
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    found = find_dicom_series(root, include_derived)
    return [s for s in found if modalities is None or s.modality in modalities]


def _list(series: list[DicomSeries]) -> str:
    return "; ".join(s.summary() for s in series)


def _not_ct_hint() -> str:
    return "ldct-clip denoises CT only (from Python, load_ct(..., allow_non_ct=True) reads other modalities)"


def select_series(
    root: str | os.PathLike,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    include_derived: bool | None = False,
) -> DicomSeries:
    """Pick the one series to load from ``root``, with a message that lists the choices when it is ambiguous.

    Args:
        root: a folder (searched recursively) or one DICOM file.
        series_uid: the SeriesInstanceUID to take (it may name a series ldct-clip denoised).
        allow_non_ct: accept a series whose Modality is not CT.
        include_derived: consider series ldct-clip itself denoised (see :func:`scan_dicom`); ``None``:
            only where the folder holds nothing else (reading an output back), never next to an input.

    Returns:
        the series; its ``skipped`` says what the scan left out.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    if root.is_dir() and not any(files for _, _, files in os.walk(root)):
        raise InputError(f"folder {root} is empty; point to the folder holding the DICOM series")
    scan = scan_dicom(root, bool(include_derived))
    found = scan.series
    if include_derived is None and not found and scan.derived:
        found, scan.derived = scan.derived, []
        for series in found:
            series.skipped = scan.summary()
    if series_uid is not None:
        match = [s for s in found + scan.derived if s.uid == series_uid]
        if not match:
            raise InputError(f"series_uid {series_uid} not found in {root}; available: {_list(found)}")
        chosen = match[0]
    else:
        if not found and scan.derived:
            raise InputError(
                f"{root} holds only series that ldct-clip denoised ({_list(scan.derived)}); pass "
                f"{INCLUDE_DERIVED_FLAG} (Python: include_derived=True) to read them anyway"
            )
        if not found:
            what = f" ({scan.summary()})" if scan.summary() else ""
            raise InputError(
                f"no DICOM images found in {root}{what}; point to a DICOM series folder, a NIfTI or .mha/.nrrd file"
            )
        candidates = found if allow_non_ct else [s for s in found if s.modality == "CT"]
        if not candidates:
            raise InputError(
                f"{root} holds no CT images (Modality {', '.join(sorted({s.modality or '<none>' for s in found}))}); "
                f"{_not_ct_hint()}"
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
            f"series {chosen.uid} is not CT (Modality {chosen.modality or '<none>'}); {_not_ct_hint()}"
        )
    return chosen


def decode_pixels(header: SliceHeader) -> np.ndarray:
    """The stored pixel values of one file, decoded from the header already read (no second parse).

    The deferred pixel data element is read from the file at its recorded offset and handed to pydicom's
    decoder for the file's transfer syntax (pylibjpeg / openjpeg plugins for the compressed ones). A
    deflated file has no offsets into the file (its dataset was inflated in memory): it is read whole.

    Returns:
        ``(rows, columns)`` for a single frame, ``(frames, rows, columns)`` for several.

    Raises:
        InputError: the pixel data cannot be decoded (truncated, corrupt, or a missing decoder plugin).
    """
    ds, path = header.dataset, header.path
    try:
        keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax == DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(path).pixel_array
        element = ds.get_item(keyword, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None and element.length:
            value = read_deferred_data_element(ds.fileobj_type, ds.filename, ds.timestamp, element).value
        else:
            value = ds[keyword].value
        options = as_pixel_options(ds)
        array = get_decoder(syntax).as_array(value, pixel_keyword=keyword, **options)[0]
    except (
        Exception
    ) as e:  # decoders raise many types (ValueError, RuntimeError, their own): all mean unreadable
        raise InputError(
            f"cannot decode the pixel data of {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
            "the file is truncated or corrupt, or its transfer syntax needs a missing decoder plugin"
        ) from e
    return array
