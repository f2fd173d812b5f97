"""Bayer colour filter arrays of the camera pipeline (``ldct_clip.transforms.isp``): the four 2x2 patterns,
mosaicking an RGB image, per-site gains, and Malvar-He-Cutler (2004) linear demosaicing.

Demosaicing mirrors the border without repeating the edge sample (torch's ``reflect`` padding, scipy's
``mirror``), which keeps the Bayer phase, where the reference's scipy ``"reflect"`` mixes colours in the
outer two rows and columns.
"""

from __future__ import annotations

import numpy as np
import torch

from ldct_clip.errors import InputError

__all__ = ["BAYER_PATTERNS", "bayer_gains", "bayer_masks", "demosaic_malvar", "mosaic"]

BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")


def bayer_masks(shape: tuple[int, int], pattern: str) -> dict[str, np.ndarray]:
    """Boolean masks ``{"R", "G", "B"}`` of a Bayer pattern (2x2 tile read row by row, e.g. "RGGB")."""
    pattern = pattern.upper()
    if pattern not in BAYER_PATTERNS:
        raise InputError(f"unknown Bayer pattern {pattern!r}; use one of {', '.join(BAYER_PATTERNS)}")
    masks = {c: np.zeros(shape, bool) for c in "RGB"}
    for index, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        masks[pattern[index]][dy::2, dx::2] = True
    return masks


_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # the 2x2 Bayer tile read row by row


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """(H, W, 3) -> (H, W) Bayer mosaic."""
    pattern = pattern.upper()
    bayer_masks((2, 2), pattern)  # validates
    out = np.empty(rgb.shape[:2], dtype=rgb.dtype)
    for (dy, dx), colour in zip(_PHASES, pattern):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "RGB".index(colour)]
    return out


def bayer_gains(shape: tuple[int, int], pattern: str, red: float, blue: float) -> np.ndarray:
    """(H, W) float32 gains of a Bayer mosaic: ``red`` at red sites, ``blue`` at blue sites, 1 at green ones."""
    bayer_masks((2, 2), pattern)  # validates
    gains = np.ones(shape, dtype=np.float32)
    for (dy, dx), colour in zip(_PHASES, pattern.upper()):
        if colour != "G":
            gains[dy::2, dx::2] = red if colour == "R" else blue
    return gains


# Malvar, He, Cutler (ICASSP 2004), Fig. 2, all divided by 8: green at red/blue sites; red (blue) at a green
# site whose row holds red (blue); its transpose for the column case; red at blue sites and blue at red sites.
_G_AT_RB = (
    np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]], float)
    / 8
)
_RB_AT_G_ROW = (
    np.array(
        [[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]], float
    )
    / 8
)
_RB_AT_G_COL = _RB_AT_G_ROW.T
_RB_AT_BR = (
    np.array(
        [[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]],
        float,
    )
    / 8
)


def demosaic_malvar(cfa: np.ndarray, pattern: str) -> np.ndarray:
    """Malvar-He-Cutler linear demosaicing of an (H, W) Bayer mosaic to (H, W, 3), not clipped.

    Own implementation (the four 5x5 kernels of the paper in one ``conv2d`` call, then each 2x2 phase of the
    mosaic takes its values): the ``colour-demosaicing`` package (BSD-3) has it too, but is not worth a
    dependency for this. Borders are mirrored without repeating the edge sample (``reflect`` padding),
    which keeps the Bayer phase. Computes in the input's float precision (float32 or float64).
    """
    cfa = np.asarray(cfa)
    if not np.issubdtype(cfa.dtype, np.floating):
        cfa = cfa.astype(np.float64)
    pattern = pattern.upper()
    bayer_masks((2, 2), pattern)  # validates the pattern
    h, w = cfa.shape
    if h < 3 or w < 3:
        raise InputError(f"demosaicing needs an image of at least 3x3 pixels, got {h}x{w}")
    kernels = torch.from_numpy(
        np.stack([_G_AT_RB, _RB_AT_G_ROW, _RB_AT_G_COL, _RB_AT_BR])[:, None].astype(cfa.dtype)
    )
    source = torch.from_numpy(np.ascontiguousarray(cfa))[None, None]
    padded = torch.nn.functional.pad(source, (2, 2, 2, 2), mode="reflect")
    green_rb, along_row, along_col, across = torch.nn.functional.conv2d(padded, kernels)[0].numpy()
    out = np.empty((h, w, 3), dtype=cfa.dtype)
    index = {"R": 0, "G": 1, "B": 2}
    for dy in (0, 1):
        row_colour = pattern[2 * dy] if pattern[2 * dy] != "G" else pattern[2 * dy + 1]  # R or B row
        for dx in (0, 1):
            site = (slice(dy, None, 2), slice(dx, None, 2))
            colour = pattern[2 * dy + dx]
            if colour == "G":
                other = "B" if row_colour == "R" else "R"
                out[site + (1,)] = cfa[site]
                out[site + (index[row_colour],)] = along_row[site]  # the row's colour sits left and right
                out[site + (index[other],)] = along_col[site]
            else:
                other = "B" if colour == "R" else "R"
                out[site + (index[colour],)] = cfa[site]
                out[site + (1,)] = green_rb[site]
                out[site + (index[other],)] = across[site]
    return out
