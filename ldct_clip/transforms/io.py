"""Reading and writing CT volumes as MONAI transforms, so bundle configs can use ldct_clip.io.

``LoadCT`` / ``LoadCTd`` wrap :func:`ldct_clip.io.load_ct` (DICOM series with grouping and validation,
NIfTI, other ITK formats) where a bundle would otherwise use ``LoadImaged``; ``SaveCT`` / ``SaveCTd``
write the result as a derived DICOM series and/or NIfTI through ldct_clip.io (atomic, never over the
input, never over an existing output unless asked). :func:`plan_outputs` is the one place that decides
the output layout, shared by the bundle and ``ldct-clip denoise``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ldct_clip.errors import InputError

__all__ = [
    "DICOM_SUBDIR",
    "NIFTI_NAME",
    "OUTPUT_FORMATS",
    "LoadCT",
    "LoadCTd",
    "SaveCT",
    "SaveCTd",
    "check_outputs",
    "plan_outputs",
]

OUTPUT_FORMATS = ("auto", "dicom", "nifti", "both")
#: File name of the NIfTI output when the output path is a folder.
NIFTI_NAME = "denoised.nii.gz"
#: Sub-folder of the DICOM series when both formats are written.
DICOM_SUBDIR = "dicom"
DEFAULT_DESCRIPTION: str | None = None  # save_dicom_series default: the source's + " [denoised]"


def plan_outputs(output: str | os.PathLike, output_format: str, source_kind: str) -> dict[str, Path]:
    """Where each output goes: ``{"dicom": folder, "nifti": file}`` (only the formats written).

    - ``"dicom"``: the derived series' files directly in ``output`` (a folder);
    - ``"nifti"``: ``output`` itself if it ends in ``.nii``/``.nii.gz``, else ``output/denoised.nii.gz``;
    - ``"both"``: ``output/dicom/`` and ``output/denoised.nii.gz``;
    - ``"auto"``: ``"dicom"`` for a DICOM input, ``"nifti"`` otherwise.

    Args:
        output: the output path given by the user.
        output_format: one of :data:`OUTPUT_FORMATS`.
        source_kind: ``"dicom"``, ``"nifti"`` or ``"itk"`` (``volume.meta["source_kind"]``).

    Raises:
        InputError: unknown format, or DICOM output asked for a non-DICOM input.
    """
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "auto":
        output_format = "dicom" if source_kind == "dicom" else "nifti"
    if output_format in ("dicom", "both") and source_kind != "dicom":
        raise InputError(
            f"DICOM output needs a DICOM series as input (the derived series takes its patient and study "
            f"from it), this input is {source_kind}: use --format nifti"
        )
    output = Path(output)
    is_nifti_path = output.name.endswith((".nii", ".nii.gz"))
    if output_format == "nifti":
        return {"nifti": output if is_nifti_path else output / NIFTI_NAME}
    if is_nifti_path:
        raise InputError(
            f"{output} is a NIfTI file name but {output_format} output needs a folder: drop the suffix"
        )
    if output_format == "dicom":
        return {"dicom": output}
    return {"dicom": output / DICOM_SUBDIR, "nifti": output / NIFTI_NAME}


def check_outputs(
    source: str | os.PathLike,
    output: str | os.PathLike,
    output_format: str,
    source_kind: str,
    overwrite: bool,
) -> dict[str, Path]:
    """Check, before anything is computed or written, that the outputs may be written; return the plan.

    Args:
        source: the input file or folder (outputs must not be it, lie inside it or contain it).
        output, output_format, source_kind: see :func:`plan_outputs`.
        overwrite: whether existing outputs may be replaced.

    Raises:
        InputError: see :func:`plan_outputs`.
        OutputError: an output is the input, lies inside or contains it, or exists without ``overwrite``.
    """
    from ldct_clip.io import check_output_path

    targets = plan_outputs(output, output_format, source_kind)
    # both formats go into one folder, written as a whole
    for target in [Path(output)] if len(targets) > 1 else targets.values():
        check_output_path(source, target, overwrite)
    return targets


class LoadCT(Transform):
    """Load a CT volume as a ``(1, X, Y, Z)`` float32 HU MetaTensor with :func:`ldct_clip.io.load_ct`.

    Args:
        series_uid: which series to take from a folder holding several (None: the only one).
        allow_non_ct: accept a series whose Modality is not CT.
    """

    def __init__(self, series_uid: str | None = None, allow_non_ct: bool = False) -> None:
        self.series_uid = series_uid
        self.allow_non_ct = allow_non_ct

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        """
        Args:
            path: a DICOM series folder or file, a NIfTI file or another ITK-readable volume.
        """
        from ldct_clip.io import load_ct

        if path is None or str(path) == "":
            raise InputError(
                "no input given: pass --input PATH (a DICOM series folder or file, NIfTI, .mha/.nrrd)"
            )
        return load_ct(path, series_uid=self.series_uid, allow_non_ct=self.allow_non_ct)


class LoadCTd(MapTransform):
    """Dictionary-based :class:`LoadCT`: replaces each path under ``keys`` with its volume.

    Args:
        keys: keys of the paths to load.
        series_uid: which series to take from a folder holding several (None: the only one).
        allow_non_ct: accept a series whose Modality is not CT.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        allow_non_ct: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCT(series_uid=series_uid, allow_non_ct=allow_non_ct)

    def __call__(self, data: Mapping[Hashable, str | os.PathLike]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class SaveCT(Transform):
    """Write a HU volume as a derived DICOM series and/or NIfTI, laid out by :func:`plan_outputs`.

    The DICOM series is derived from the volume's source series (``meta["source_path"]``): same patient,
    study and frame of reference, a new series. Every target is checked before anything is written
    (:func:`check_outputs`: not inside the input, not an existing path unless ``overwrite``) and written
    atomically (both formats: the whole folder at once). The written paths are recorded in
    ``meta["saved_to"]``.

    Args:
        output: output folder (or ``.nii.gz`` file for NIfTI only).
        output_format: ``"auto"``, ``"dicom"``, ``"nifti"`` or ``"both"``.
        description: SeriesDescription of the derived DICOM series (None: the source's + " [denoised]").
        overwrite: replace existing outputs.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        output_format: str = "auto",
        description: str | None = DEFAULT_DESCRIPTION,
        overwrite: bool = False,
    ) -> None:
        self.output = Path(output)
        self.output_format = output_format
        self.description = description
        self.overwrite = overwrite

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """
        Args:
            volume: ``(1, X, Y, Z)`` HU MetaTensor carrying the source's meta (``source_path``, ``source_kind``).
        """
        from ldct_clip.io import atomic_output, save_dicom_series, save_nifti

        meta = getattr(volume, "meta", {})
        source = meta.get("source_path")
        if source is None:
            raise InputError("the volume carries no meta['source_path']: load it with ldct_clip.io.load_ct")
        kind = str(meta.get("source_kind", ""))
        targets = check_outputs(source, self.output, self.output_format, kind, self.overwrite)
        if len(targets) > 1:
            with atomic_output(self.output, overwrite=self.overwrite, is_dir=True) as tmp:
                save_dicom_series(volume, source, tmp / DICOM_SUBDIR, description=self.description)
                save_nifti(volume, tmp / NIFTI_NAME)
        elif "dicom" in targets:
            save_dicom_series(
                volume, source, targets["dicom"], description=self.description, overwrite=self.overwrite
            )
        else:
            targets["nifti"].parent.mkdir(parents=True, exist_ok=True)
            save_nifti(volume, targets["nifti"], overwrite=self.overwrite)
        if isinstance(volume, MetaTensor):
            volume.meta["saved_to"] = {kind: str(path) for kind, path in targets.items()}
        return volume


class SaveCTd(MapTransform):
    """Dictionary-based :class:`SaveCT`.

    Args:
        keys: keys of the volumes to write (usually ``"pred"``).
        output: output folder (or ``.nii.gz`` file for NIfTI only).
        output_format: ``"auto"``, ``"dicom"``, ``"nifti"`` or ``"both"``.
        description: SeriesDescription of the derived DICOM series (None: the source's + " [denoised]").
        overwrite: replace existing outputs.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output: str | os.PathLike,
        output_format: str = "auto",
        description: str | None = DEFAULT_DESCRIPTION,
        overwrite: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.saver = SaveCT(output, output_format=output_format, description=description, overwrite=overwrite)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.saver(d[key])
        return d
