"""Slices arranged for display in the radiological convention: anterior at the top, the patient's right on
the viewer's left. Figures, and the measurements placed on what a figure shows, work on these."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["display_pixel_spacing", "display_slice", "oriented_slice", "volume_affine"]


def volume_affine(volume: object) -> np.ndarray | None:
    """The 4x4 affine of a MetaTensor volume as float64, None for a plain tensor or array."""
    affine = getattr(volume, "affine", None)
    if affine is None:
        return None
    affine = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    return affine[0] if affine.ndim == 3 else affine


def display_slice(slice_xy: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """A slice ``(X, Y)`` of a volume arranged for display in the radiological convention. Without an affine
    the voxel axes are taken as RAS.

    The voxel axes of a loaded volume need not follow RAS (MONAI keeps the file's order unless told to
    reorient), so the flips come from the affine's direction cosines.
    """
    image = np.asarray(slice_xy)
    if affine is None:
        affine = np.eye(4)
    directions = np.asarray(affine, dtype=np.float64)[:3, :2]
    world_axis = np.argmax(np.abs(directions), axis=0)
    sign = np.sign(directions[world_axis, [0, 1]])
    if world_axis[0] == 1:  # voxel axis 0 runs anterior-posterior: make it the second axis
        image, world_axis, sign = image.T, world_axis[::-1], sign[::-1]
    # Now axis 0 runs along world x (R+) and axis 1 along world y (A+). Rows: anterior (max y) at the top;
    # columns: the patient's right (max x) on the left.
    image = image.T  # rows = y, cols = x
    if sign[1] > 0:
        image = image[::-1, :]
    if sign[0] > 0:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def oriented_slice(
    slice_2d: np.ndarray | torch.Tensor, affine: np.ndarray | None, oriented: bool
) -> np.ndarray:
    """One slice of a pair's volume for display and measurement, float64: as stored when ``oriented`` (Mayo
    npy slices are stored in display orientation), else arranged by :func:`display_slice`."""
    array = slice_2d.detach().cpu().numpy() if isinstance(slice_2d, torch.Tensor) else np.asarray(slice_2d)
    return (array if oriented else display_slice(array, affine)).astype(np.float64)


def display_pixel_spacing(affine: np.ndarray | None) -> tuple[float, float] | None:
    """``(row, column)`` pixel spacing in mm of the slices ``display_slice`` returns; None without affine."""
    if affine is None:
        return None
    directions = np.asarray(affine, dtype=np.float64)[:3, :2]
    spacing = np.linalg.norm(directions, axis=0)
    # display_slice puts the voxel axis that runs along world y (anterior-posterior) on the rows.
    row_axis = 0 if np.argmax(np.abs(directions[:, 0])) == 1 else 1
    return float(spacing[row_axis]), float(spacing[1 - row_axis])
