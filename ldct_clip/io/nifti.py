"""NIfTI output: HU as int16 with the volume's affine, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ldct_clip.errors import OutputError
from ldct_clip.io.atomic import atomic_output, check_output_path
from ldct_clip.io.volume_array import single_channel_array

__all__ = ["save_nifti"]


def save_nifti(volume, path: str | os.PathLike, overwrite: bool = False, affine=None) -> Path:
    """Write a HU volume as NIfTI (int16, rounded and clipped; affine preserved, RAS as MONAI and NIfTI use).

    Args:
        volume: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` tensor/array in HU; a ``MetaTensor`` brings its affine
            and, through ``meta["source_path"]``, the input it must not overwrite.
        path: ``.nii`` or ``.nii.gz`` file to create.
        overwrite: replace an existing file.
        affine: RAS affine when ``volume`` carries none (default identity).

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
    hu = np.clip(np.rint(array), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    image = nib.Nifti1Image(hu, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # int16 stored as is: no scl_slope/scl_inter, so readers see exact HU integers.
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_output(path, overwrite=overwrite) as tmp:
        nib.save(image, str(tmp))
    return path
