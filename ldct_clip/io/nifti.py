"""NIfTI output: HU as int16 with the volume's affine, staged and published with its sidecar manifest."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ldct_clip.errors import OutputError
from ldct_clip.io.preflight import nifti_bytes
from ldct_clip.io.provenance import Provenance
from ldct_clip.io.staging import check_output_path, fault_point, staged_output
from ldct_clip.io.volume_array import single_channel_array

__all__ = ["save_nifti"]


def save_nifti(
    volume,
    path: str | os.PathLike,
    overwrite: bool = False,
    affine=None,
    provenance: Provenance | None = None,
    command: str = "",
) -> Path:
    """Write a HU volume as NIfTI (int16, rounded and clipped; affine preserved, RAS as MONAI and NIfTI use).

    The file gets a sidecar ``<name>.ldct-clip.json`` (its manifest: size, sha256, command, provenance).

    Args:
        volume: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` tensor/array in HU; a ``MetaTensor`` brings its affine
            and, through ``meta["source_path"]``, the input it must not overwrite.
        path: ``.nii`` or ``.nii.gz`` file to create.
        overwrite: replace an existing file if it is an unchanged ldct-clip output.
        affine: RAS affine when ``volume`` carries none (default identity).
        provenance: what made the volume: abridged in the header's ``descrip`` (80 bytes), complete in the
            sidecar.
        command: the command line recorded in the sidecar (default: this process's).

    Returns:
        the output path.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise OutputError(f"NIfTI output {path} must end in .nii or .nii.gz")
    meta = getattr(volume, "meta", None) or {}
    check_output_path(meta.get("source_path"), path, overwrite)
    if affine is None:
        affine = getattr(volume, "affine", None)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    array = single_channel_array(volume, "NIfTI")
    if not np.isfinite(array).all():
        raise OutputError("volume contains NaN/Inf values; nothing written")
    # one float temporary, clipped in place: the volume is held twice, not three times (integer input is
    # widened first: np.rint would make float16 of int16)
    rounded = np.rint(array) if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)
    np.clip(rounded, np.iinfo(np.int16).min, np.iinfo(np.int16).max, out=rounded)
    hu = rounded.astype(np.int16)
    del rounded
    image = nib.Nifti1Image(hu, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # int16 stored as is: no scl_slope/scl_inter, so readers see exact HU integers.
    image.header.set_slope_inter(1.0, 0.0)
    if provenance is not None:
        image.header["descrip"] = provenance.nifti_descrip().encode("ascii")
    with staged_output(
        path,
        overwrite=overwrite,
        provenance=provenance,
        command=command or (provenance.command if provenance else ""),
        needed_bytes=nifti_bytes(hu.shape),
    ) as tmp:
        nib.save(image, str(tmp))
        fault_point("file-written")
    return path
