"""Reading and writing CT volumes and images as MONAI transforms: the loaders and writers of the bundles.

- ``LoadCT`` / ``LoadCTd`` wrap :func:`ldct_clip.io.load_ct` (DICOM series with grouping and validation,
  NIfTI, other ITK formats; a :class:`~ldct_clip.io.DicomSeries` from job planning is decoded from the
  headers already read) where a bundle would otherwise use ``LoadImaged``.
- ``SaveCT`` / ``SaveCTd`` write a HU volume as a derived DICOM series and/or NIfTI through ldct_clip.io
  (staged, published atomically, with a manifest and the provenance of the weights).
- ``LoadImaged`` / ``SaveImaged`` do the same for the image tasks (PNG, JPEG, TIFF at their bit depth).

The dictionary transforms take each item's destination from the item itself (``output``, and for CT
``output_format``), so one pipeline writes every series of a ``--recursive`` run to its own place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ldct_clip.errors import InputError
from ldct_clip.io import load_ct, load_image, save_dicom_series, save_image, save_nifti
from ldct_clip.io.dicom_series import DicomSeries
from ldct_clip.io.handlers import StagedFolder
from ldct_clip.io.jobs import DICOM_SUBDIR, NIFTI_NAME, plan_outputs
from ldct_clip.io.staging import staged_output

__all__ = ["LoadCT", "LoadCTd", "LoadImaged", "SaveCT", "SaveCTd", "SaveImaged"]

#: What the writers take as provenance: the record itself, or a callable giving it once the weights are
#: loaded (the bundles' ``WeightsLoader.provenance``).
ProvenanceSource = Callable[[], object] | object | None


def _provenance(source: ProvenanceSource):
    return source() if callable(source) else source


class LoadCT(Transform):
    """Load a CT volume as a ``(1, X, Y, Z)`` float32 HU MetaTensor with :func:`ldct_clip.io.load_ct`.

    A volume already in memory (a tensor, e.g. from an evaluation loop) is passed through unchanged.

    Args:
        series_uid: which series to take from a folder holding several (None: the only one).
        progress: a progress bar while a long series is decoded.
    """

    def __init__(self, series_uid: str | None = None, progress: bool = True) -> None:
        self.series_uid = series_uid
        self.progress = progress

    def __call__(self, source: str | os.PathLike | DicomSeries | MetaTensor) -> MetaTensor:
        """
        Args:
            source: a DICOM series folder or file, a :class:`~ldct_clip.io.DicomSeries`, a NIfTI file or
                another ITK-readable volume, or a volume already loaded.
        """
        if isinstance(source, torch.Tensor):
            return source
        if source is None or str(source) == "":
            raise InputError(
                "no input given: pass --input PATH (a DICOM series folder or file, NIfTI, .mha/.nrrd)"
            )
        if isinstance(source, DicomSeries):
            return load_ct(source, progress=self.progress)
        return load_ct(source, series_uid=self.series_uid, progress=self.progress)


class LoadCTd(MapTransform):
    """Dictionary-based :class:`LoadCT`: replaces each source under ``keys`` with its volume.

    Args:
        keys: keys of the sources to load.
        series_uid: which series to take from a folder holding several (None: the only one).
        progress: a progress bar while a long series is decoded.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        progress: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCT(series_uid=series_uid, progress=progress)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class SaveCT(Transform):
    """Write a HU volume as a derived DICOM series and/or NIfTI, laid out by :func:`ldct_clip.io.jobs.plan_outputs`.

    The DICOM series is derived from the volume's source series (``meta["source_path"]``): same patient,
    study and frame of reference, a new series carrying the provenance (weights and their sha256, bundle,
    ldct-clip version). Each target is staged and published atomically (both formats: the whole folder at
    once), never over anything but an unchanged ldct-clip output; check the outputs before computing with
    :func:`ldct_clip.io.jobs.plan_ct_jobs`. The written paths are recorded in ``meta["saved_to"]``.

    Args:
        output: output folder (or ``.nii.gz`` file for NIfTI only).
        output_format: ``"auto"``, ``"dicom"``, ``"nifti"`` or ``"both"``.
        description: SeriesDescription of the derived DICOM series (None: the source's + " [denoised]").
        overwrite: replace existing outputs (only outputs ldct-clip wrote).
        provenance: what made the volume (:class:`ldct_clip.io.provenance.Provenance`, or a callable
            returning it), recorded in every output.
        progress: a progress bar while a long series is written.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        output_format: str = "auto",
        description: str | None = None,
        overwrite: bool = False,
        provenance: ProvenanceSource = None,
        progress: bool = True,
    ) -> None:
        self.output = Path(output)
        self.output_format = output_format
        self.description = description
        self.overwrite = overwrite
        self.provenance = provenance
        self.progress = progress

    def __call__(self, volume: torch.Tensor, series: DicomSeries | None = None) -> torch.Tensor:
        """
        Args:
            volume: ``(1, X, Y, Z)`` HU MetaTensor carrying the source's meta (``source_path``, ``source_kind``).
            series: the source series as job planning read it (its headers are not read again).
        """
        meta = getattr(volume, "meta", {})
        source = meta.get("source_path")
        if source is None:
            raise InputError("the volume carries no meta['source_path']: load it with ldct_clip.io.load_ct")
        kind = str(meta.get("source_kind", ""))
        # the layout only: job planning checked every output before anything was computed, and the writers
        # publish through staged_output, which refuses anything that is not an unchanged ldct-clip output
        targets = plan_outputs(self.output, self.output_format, kind)
        provenance = _provenance(self.provenance)
        dicom_source = series if series is not None else source
        if len(targets) > 1:
            with staged_output(
                self.output, overwrite=self.overwrite, is_dir=True, provenance=provenance
            ) as tmp:
                save_dicom_series(
                    volume,
                    dicom_source,
                    tmp / DICOM_SUBDIR,
                    description=self.description,
                    provenance=provenance,
                )
                save_nifti(volume, tmp / NIFTI_NAME, provenance=provenance)
        elif "dicom" in targets:
            save_dicom_series(
                volume,
                dicom_source,
                targets["dicom"],
                description=self.description,
                overwrite=self.overwrite,
                provenance=provenance,
                progress=self.progress,
            )
        else:
            targets["nifti"].parent.mkdir(parents=True, exist_ok=True)
            save_nifti(volume, targets["nifti"], overwrite=self.overwrite, provenance=provenance)
        if isinstance(volume, MetaTensor):
            volume.meta["saved_to"] = {kind: str(path) for kind, path in targets.items()}
        return volume


class SaveCTd(MapTransform):
    """Dictionary-based :class:`SaveCT`; each item may carry its own destination.

    Args:
        keys: keys of the volumes to write (usually ``"pred"``).
        output: output folder (or ``.nii.gz`` file) for items without ``output_key``; None: such items are
            not written (e.g. an evaluation that keeps the result in memory).
        output_format: ``"auto"``, ``"dicom"``, ``"nifti"`` or ``"both"``, for items without ``format_key``.
        description: SeriesDescription of the derived DICOM series (None: the source's + " [denoised]").
        overwrite: replace existing outputs (only outputs ldct-clip wrote).
        provenance: see :class:`SaveCT`.
        output_key: the item's key holding its output path.
        format_key: the item's key holding its output format.
        series_key: the item's key holding the source :class:`~ldct_clip.io.DicomSeries` (job planning's).
        progress: a progress bar while a long series is written.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output: str | os.PathLike | None = None,
        output_format: str = "auto",
        description: str | None = None,
        overwrite: bool = False,
        provenance: ProvenanceSource = None,
        output_key: str = "output",
        format_key: str = "output_format",
        series_key: str = "series",
        progress: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_key = series_key
        self.progress = progress
        self.output = output
        self.output_format = output_format
        self.description = description
        self.overwrite = overwrite
        self.provenance = provenance
        self.output_key = output_key
        self.format_key = format_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        output = d.get(self.output_key, self.output)
        if output is None:
            return d
        saver = SaveCT(
            output,
            output_format=str(d.get(self.format_key, self.output_format)),
            description=self.description,
            overwrite=self.overwrite,
            provenance=self.provenance,
            progress=self.progress,
        )
        series = d.get(self.series_key)
        for key in self.key_iterator(d):
            d[key] = saver(d[key], series if isinstance(series, DicomSeries) else None)
        return d


class LoadImaged(MapTransform):
    """Load image files (PNG, JPEG, TIFF, BMP) as ``(C, H, W)`` float32 in [0, 1] with
    :func:`ldct_clip.io.load_image`, keeping their bit depth in the meta for the writer.

    Args:
        keys: keys of the image paths.
        channels: None keeps the file's channels; 3 repeats a grey image to RGB; 1 requires grey.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, channels: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] if isinstance(d[key], torch.Tensor) else load_image(d[key], self.channels)
        return d


class SaveImaged(MapTransform):
    """Write ``(C, H, W)`` images in [0, 1] to each item's ``output`` file at the bit depth they were read with.

    Args:
        keys: keys of the images to write (usually ``"pred"``).
        like: the key of the loaded input whose meta (bit depth) the output keeps.
        overwrite: replace existing files (only files ldct-clip wrote).
        output_key: the item's key holding its output path; items without it are not written.
        stage: the run's :class:`~ldct_clip.io.handlers.StagedFolder` when the outputs make one folder (written
            into its staging path, published with one manifest); None: each file is published on its own, with
            its sidecar manifest.
        provenance: what made the images (or a callable giving it), for the single files' sidecars.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        like: str = "image",
        overwrite: bool = False,
        output_key: str = "output",
        stage: StagedFolder | None = None,
        provenance: ProvenanceSource = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.like = like
        self.overwrite = overwrite
        self.output_key = output_key
        self.stage = stage
        self.provenance = provenance

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        output = d.get(self.output_key)
        if output is None:
            return d
        bit_depth = getattr(d.get(self.like), "meta", {}).get("bit_depth")
        staged = self.stage is not None and self.stage.path is not None
        for key in self.key_iterator(d):
            image = MetaTensor(torch.as_tensor(d[key]).clamp(0.0, 1.0), meta={"bit_depth": bit_depth})
            if staged:
                save_image(image, self.stage.target(output), manifest=False)
            else:
                save_image(image, output, overwrite=self.overwrite, provenance=_provenance(self.provenance))
        return d
