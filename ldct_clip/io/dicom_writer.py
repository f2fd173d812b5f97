"""Derived DICOM series: the denoised volume written next to (never over) the series it came from.

Each output slice is a fresh dataset built from the matching source slice's header (patient, study,
frame of reference, geometry), with new series/instance UIDs, DERIVED image type, a reference to the
source slice, the provenance (which weights, bundle and ldct-clip version) and uncompressed int16 pixels,
so viewers and PACS file it next to the original. The series is staged and published whole with its
manifest (:func:`ldct_clip.io.staging.staged_output`).
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from tqdm.auto import tqdm

import ldct_clip
from ldct_clip.errors import OutputError
from ldct_clip.io.dicom_series import (
    DicomSeries,
    is_dicom_file,
    lps_to_ras,
    rescale_of,
    select_series,
    sorted_series_geometry,
)
from ldct_clip.io.preflight import dicom_series_bytes
from ldct_clip.io.provenance import Provenance
from ldct_clip.io.staging import check_output_path, fault_point, staged_output
from ldct_clip.io.volume_array import single_channel_array

__all__ = [
    "DENOISED_SUFFIX",
    "SERIES_NUMBER_OFFSET",
    "UNPAIRED_BODY_PARTS",
    "encode_pixels",
    "save_dicom_series",
    "write_dataset",
]

# Derived series number = source series number + this offset: visibly related, never colliding with
# the handful of series a scanner numbers 1..999 in one study.
SERIES_NUMBER_OFFSET = 1000
INT16_MIN, INT16_MAX = -32768, 32767
#: Appended to the source's SeriesDescription when no description is given.
DENOISED_SUFFIX = " [denoised]"
_LO_MAX = 64  # SeriesDescription is LO: 64 characters at most

#: Body Part Examined (0018,0015) defined terms of unpaired structures: exactly those for which dciodvfy
#: (dicom3tools, following PS3.16 Annex L) finds General Series Laterality (0020,0060) not required, found by
#: running it over every term it knows. Anything else (absent, empty, paired, or a non-standard term such
#: as "PARTIALBODY") may be a paired structure.
UNPAIRED_BODY_PARTS = frozenset(
    [
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BACK",
        "BLADDER",
        "BRAIN",
        "CEREBELLUM",
        "CERVIX",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CIRCLEOFWILLIS",
        "COCCYX",
        "COLON",
        "CORONARYARTERY",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "ESOPHAGUS",
        "FACE",
        "GALLBLADDER",
        "HEAD",
        "HEADNECK",
        "HEART",
        "ILEUM",
        "ILIUM",
        "JEJUNUM",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MAXILLA",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "THYMUS",
        "THYROID",
        "TLSPINE",
        "TONGUE",
        "TRACHEA",
        "TSPINE",
        "URETER",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "VULVA",
        "WHOLEBODY",
    ]
)

# Elements of the source header that describe its pixel data or encoding and are rewritten or dropped.
_DROPPED = (
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "IconImageSequence",
    "SourceImageSequence",
    "DerivationDescription",
    "DerivationCodeSequence",
    "DataSetTrailingPadding",
)


def encode_pixels(ds: Dataset, hu: np.ndarray, intercept: float, slope: float, signed: bool = True) -> None:
    """Set an uncompressed 16-bit MONOCHROME2 image from HU values ``(rows, columns)``.

    Stored values are ``round((HU - intercept) / slope)``, clipped to the stored type's range.
    """
    lo, hi = (INT16_MIN, INT16_MAX) if signed else (0, 65535)
    stored = np.clip(np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope), lo, hi)
    ds.set_pixel_data(
        stored.astype(np.int16 if signed else np.uint16), "MONOCHROME2", 16, generate_instance_uid=False
    )
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleSlope = f"{slope:.6g}"


def write_dataset(ds: Dataset, path: Path, transfer_syntax: str | UID = ExplicitVRLittleEndian) -> None:
    """Write ``ds`` as a DICOM Part-10 file in ``transfer_syntax`` (compressing if the syntax needs it)."""
    ts = UID(transfer_syntax)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"LDCTCLIP_{ldct_clip.__version__}"[:16]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts)  # encoders: pydicom's RLE, pylibjpeg-openjpeg for JPEG 2000
    else:
        meta.TransferSyntaxUID = ts
    dcmwrite(path, ds, enforce_file_format=True)


def _as_volume(volume) -> np.ndarray:
    # no float64 copy of the volume (2x its float32 size at 512x512x300): encode_pixels widens slice by slice
    return single_channel_array(volume, "DICOM")


def _uid(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    """A UID of the dataset, falling back to the file meta copy (some anonymisers blank only the former)."""
    value = str(ds.get(keyword, "") or "")
    if not value and "file_meta" in ds.__dict__:
        value = str(ds.file_meta.get(meta_keyword, "") or "")
    return value


def _derived_dataset(
    source: Dataset,
    series_uid: str,
    series_number: int,
    description: str,
    provenance: Provenance,
    derivation: str | None,
    study_uid: str,
) -> Dataset:
    ds = Dataset()
    # Iterate over tags, not elements: touching the (deferred) pixel data would read it from disk.
    for tag in sorted(source.keys()):
        if tag.is_private or tag.group == 0x0002 or tag.element == 0 or keyword_for_tag(tag) in _DROPPED:
            continue
        ds.add(copy.deepcopy(source[tag]))  # a copy: setting values below must not alter the source header
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:_LO_MAX]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    kept = [str(v) for v in source.get("ImageType", [])][2:] or ["AXIAL"]
    ds.ImageType = ["DERIVED", "SECONDARY", *kept]
    provenance.apply_to_dataset(ds)
    if derivation is not None:
        ds.DerivationDescription = derivation[:1024]  # ST: 1024 characters at most
    # No DerivationCodeSequence: CID 7203 "Image Derivation" has no code for learned denoising or for
    # simulated noise insertion, and a near miss (113087 "Smoothing") would misinform; the text says it.
    _complete_laterality(ds)
    reference = Dataset()
    reference.ReferencedSOPClassUID = _uid(source, "SOPClassUID", "MediaStorageSOPClassUID") or CTImageStorage
    source_instance = _uid(source, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
    if source_instance:
        reference.ReferencedSOPInstanceUID = source_instance
        ds.SourceImageSequence = Sequence([reference])
    return ds


def _complete_laterality(ds: Dataset) -> None:
    """Add an empty Laterality where the General Series module may require it and the source gave none.

    Laterality (0020,0060) is Type 2C, "required if the body part examined is a paired structure and Image
    Laterality, Frame Laterality or Measurement Laterality are not present" (PS3.3 C.7.3.1). Anonymised or
    vendor-tagged sources often omit it while their Body Part Examined is absent or a non-standard term
    (e.g. "PARTIALBODY"), so the condition cannot be ruled out: the derived series then carries it empty,
    which for a Type 2 attribute means "unknown", the truth for us (the side is not ours to invent). Where the
    condition is known to be unmet (a standard unpaired body part) it stays absent, as the standard wants.
    A source with its own Laterality, Image/Measurement Laterality or coded anatomy (Anatomic Region
    Sequence, whose pairedness then decides) is left as it is.
    """
    if any(
        k in ds for k in ("Laterality", "ImageLaterality", "MeasurementLaterality", "AnatomicRegionSequence")
    ):
        return
    if str(ds.get("BodyPartExamined", "") or "").strip() in UNPAIRED_BODY_PARTS:
        return
    ds.Laterality = ""


def _series_description(source_description: str, suffix: str) -> str:
    """The source's description with ``suffix``; the source part is shortened so the suffix always fits."""
    suffix = suffix[:_LO_MAX]
    return (source_description or "CT")[: _LO_MAX - len(suffix)].rstrip() + suffix


def save_dicom_series(
    volume,
    source: str | os.PathLike | DicomSeries | None,
    output_dir: str | os.PathLike,
    description: str | None = None,
    overwrite: bool = False,
    model_name: str = "CLIPDenoiser",
    series_number: int | None = None,
    derivation: str | None = None,
    description_suffix: str | None = None,
    provenance: Provenance | None = None,
    command: str = "",
    progress: bool = True,
) -> Path:
    """Write ``volume`` (HU) as a derived CT series of the DICOM series at ``source``.

    Args:
        volume: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` HU, in the orientation :func:`ldct_clip.io.load_ct` returned
            for ``source`` (undo any reorientation first, e.g. with MONAI's ``Invertd``). A ``MetaTensor``'s
            affine is checked against the source and its ``series_uid`` meta picks the series in ``source``.
        source: folder or file of the DICOM series the volume was loaded from, or the
            :class:`~ldct_clip.io.dicom_series.DicomSeries` itself (its headers are not read again).
        output_dir: folder to create, one file per slice plus ``ldct-clip-manifest.json``; staged and
            published whole, never inside the source.
        description: the full SeriesDescription (nothing is appended; cut to 64 characters); default: the
            source's description + ``description_suffix``.
        overwrite: replace an existing ``output_dir`` if it is an unchanged ldct-clip output.
        model_name: named in the DerivationDescription when ``provenance`` is not given.
        series_number: SeriesNumber; default: the source's + ``SERIES_NUMBER_OFFSET`` (1000).
        derivation: the full DerivationDescription (default: ``provenance.derivation_description()``,
            e.g. "Denoised by CLIPDenoiser (bundle ..., weights model.pt sha256 bee4a582f420) with ldct-clip 0.1.0").
        description_suffix: appended to the source's SeriesDescription when ``description`` is None
            (default: ``provenance.series_suffix()``, " [denoised]" or " [denoised, demo weights]"); the
            source part is shortened if needed so that the suffix is kept.
        provenance: the weights, bundle and task, recorded in every slice (DerivationDescription,
            ContributingEquipmentSequence) and in the manifest; default: denoised by ``model_name``, or,
            with ``derivation`` given, a derived series of unnamed kind.
        command: the command line recorded in the manifest (default: this process's).
        progress: a progress bar while a long series (64 slices or more) is written.

    Returns:
        the output folder.

    Raises:
        OutputError: no DICOM source, a volume that does not match it, or an unsafe output path.
    """
    series = source if isinstance(source, DicomSeries) else None
    if series is not None:
        source = Path(series.path)
    if source is None or not Path(source).exists():
        raise OutputError(
            f"DICOM output needs the DICOM series the volume was loaded from (source={source}); write NIfTI instead"
        )
    source = Path(source)
    if source.is_file() and not is_dicom_file(source):
        raise OutputError(f"DICOM output needs a DICOM source, {source} is not DICOM; write NIfTI instead")
    check_output_path(source, output_dir, overwrite)
    if series is None:
        meta = getattr(volume, "meta", None) or {}
        series_uid = str(meta["series_uid"]) if meta.get("series_uid") else None
        series = select_series(source, series_uid, allow_non_ct=True, include_derived=True)
    first = series.headers[0].dataset
    sop_class = _uid(first, "SOPClassUID", "MediaStorageSOPClassUID")
    if series.headers[0].is_multiframe or sop_class != CTImageStorage:
        raise OutputError(
            f"derived DICOM output supports classic CT Image Storage sources, {source} is "
            f"{UID(sop_class).name if sop_class else 'of unknown SOP class'}; write NIfTI instead"
        )
    geometry = sorted_series_geometry(series)
    array = _as_volume(volume)
    if array.shape != geometry.shape:
        raise OutputError(
            f"volume shape {array.shape} does not match the source series {geometry.shape} (columns, rows, slices); "
            "give the volume back in the orientation load_ct returned (undo Orientationd/resampling, e.g. with Invertd)"
        )
    affine = getattr(volume, "affine", None)
    if affine is not None:
        expected = lps_to_ras(geometry.affine_lps)
        if not np.allclose(np.asarray(affine, dtype=np.float64), expected, atol=1e-3):
            raise OutputError(
                "volume affine differs from the source series geometry; give the volume back in the orientation "
                "load_ct returned (undo Orientationd/flips/resampling, e.g. with Invertd)"
            )
    if not np.isfinite(array).all():
        raise OutputError("volume contains NaN/Inf values; nothing written")

    new_series_uid = generate_uid()
    study_uid = str(first.get("StudyInstanceUID", "") or "")
    if not study_uid:
        warnings.warn(
            f"source {source} has no StudyInstanceUID (anonymised?); the derived series gets a new study UID",
            UserWarning,
            stacklevel=2,
        )
        study_uid = generate_uid()
    number = series_number
    if number is None:
        number = int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    if provenance is None:
        provenance = Provenance(model_name=model_name, task="denoised" if derivation is None else "derived")
    if description is None:
        suffix = provenance.series_suffix() if description_suffix is None else description_suffix
        description = _series_description(str(first.get("SeriesDescription", "") or ""), suffix)
    headers = geometry.headers
    needed = dicom_series_bytes(len(headers), geometry.rows, geometry.columns)
    with staged_output(
        output_dir,
        overwrite=overwrite,
        is_dir=True,
        provenance=provenance,
        command=command or provenance.command,
        needed_bytes=needed,
    ) as tmp:
        for k, header in enumerate(
            tqdm(headers, desc="writing DICOM", unit="slice", disable=len(headers) < 64 or not progress)
        ):
            src = header.dataset
            ds = _derived_dataset(src, new_series_uid, number, description, provenance, derivation, study_uid)
            encode_pixels(ds, array[:, :, k].T, intercept=0.0, slope=1.0, signed=True)
            if "PixelPaddingValue" in src:
                # Padding is stored in the source's units: carry it over as the same HU value in ours.
                slope, intercept = rescale_of(src, header.path, required=False)
                padding = round(float(src.PixelPaddingValue) * slope + intercept)
                if INT16_MIN <= padding <= INT16_MAX:
                    ds.add_new("PixelPaddingValue", "SS", padding)
            write_dataset(ds, tmp / f"{k + 1:05d}.dcm")
            fault_point("slice-written")
    return Path(output_dir)
