"""Camera pipeline (ISP) noise synthesis for the sRGB task, vectorised over whole images (numpy, torch conv).

The CBDNet chain (Guo et al., CVPR 2019) as used by the reference code to make its sRGB training pairs
(``alwaysuu/CLIPDenoising``, ``basicsr/data/ISP_implement.py``, ``cbdnet_noise_generate_srgb``), our own code:

1. inverse camera response curve (sRGB value -> irradiance);
2. sRGB -> XYZ as :func:`skimage.color.rgb2xyz` computes it: the reference uses that function, which applies
   the sRGB transfer curve's inverse on top of the camera response's (:func:`srgb_to_linear`, then skimage's
   ``xyz_from_rgb`` matrix);
3. XYZ -> camera space with a random convex combination of the XYZ->camera matrices in
   :data:`XYZ_TO_CAMERA_MATRICES` (each row normalised to sum 1, result clipped to [0, 1]);
4. Bayer mosaic, one of RGGB, BGGR, GRBG, GBRG;
5. inverse white balance: red sites times ``fr``, blue sites times ``fb``, both uniform in [0.75, 1];
6. noise on the raw mosaic, exactly the reference's formula (``add_PG_noise``)::

       y = clip(x + N1 * sigma_s * x + N2 * sigma_c, 0, 1),   N1, N2 ~ N(0, 1) independent,

   i.e. a standard deviation ``sqrt((sigma_s x)^2 + sigma_c^2)``. The paper's fixed setting ("fixed") is
   sigma_s = 0.04, sigma_c = 0.03 (reference ``is_strict``: s2/4, c2/2 with s2 = 0.16, c2 = 0.06); the random
   setting draws both log-uniformly from [1e-4, 0.16] and [1e-4, 0.06];
7. white balance (divide by ``fr``, ``fb``), clip; 8. Malvar-He-Cutler (2004) demosaicing, clip;
9. camera -> XYZ (inverse matrix), clip; 10. XYZ -> sRGB as :func:`skimage.color.xyz2rgb` (matrix, sRGB
   transfer curve, clip: :func:`linear_to_srgb`);
11. camera response curve.

Differences from the reference, on purpose: curves are evaluated by linear interpolation (the reference
looks up the nearest of 1024 bins, a quantisation of up to 1/2048); demosaicing mirrors the border without
repeating the edge sample (torch's ``reflect`` padding, scipy's ``mirror``), which keeps the Bayer phase,
where the reference's scipy ``"reflect"`` mixes colours in the outer two rows and columns; the chain runs
in float32.

Camera response curves: :class:`ParametricResponse` (built in, see its docstring) or the 201 measured
curves of the DoRF database (Grossberg & Nayar) that CBDNet uses, loaded from the user's ``dorfCurves.txt``
(:func:`load_dorf_curves`) or CBDNet's ``201_CRF_data.mat`` (:func:`load_crf_mat`). They are not shipped.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type
from skimage.color.colorconv import rgb_from_xyz, xyz_from_rgb

from ldct_clip.errors import InputError

__all__ = [
    "BAYER_PATTERNS",
    "CameraParameters",
    "CameraPipelineNoise",
    "CameraPipelineNoised",
    "CameraResponse",
    "ParametricResponse",
    "XYZ_TO_CAMERA_MATRICES",
    "add_raw_noise",
    "bayer_masks",
    "demosaic_malvar",
    "linear_to_srgb",
    "load_crf_mat",
    "load_dorf_curves",
    "mosaic",
    "run_camera_pipeline",
    "srgb_to_linear",
]

# XYZ -> camera matrices, row-major. These are the four of CBDNet's ISP (copied into the reference's
# ISP_implement.py); the last three are dcraw's adobe_coeff entries (divided by 10000) for the cameras named.
# The first one's camera is not named in CBDNet.
XYZ_TO_CAMERA_MATRICES: dict[str, tuple[float, ...]] = {
    "cbdnet_0": (1.0234, -0.2969, -0.2266, -0.5625, 1.6328, -0.0469, -0.0703, 0.2188, 0.6406),
    "sony_ilce_7r": (0.4913, -0.0541, -0.0202, -0.6130, 1.3513, 0.2906, -0.1564, 0.2151, 0.7183),
    "olympus_e_p5": (0.8380, -0.2630, -0.0639, -0.2887, 1.0725, 0.2496, -0.0627, 0.1427, 0.5438),
    "sony_dsc_rx100m2": (0.6596, -0.2079, -0.0562, -0.4782, 1.3016, 0.1933, -0.0970, 0.1581, 0.5181),
}

BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")

FIXED_NOISE = (0.04, 0.03)  # (sigma_s, sigma_c): the paper's fixed Poisson-Gaussian setting
RANDOM_NOISE_MAX = (0.16, 0.06)  # upper ends of the log-uniform random setting (lower end 1e-4)


class _PiecewiseLinear:
    """``np.interp(x, xp, fp)`` in float32 for a fixed increasing table, with a uniform bucket index so that a
    whole image costs a few vectorised passes instead of one binary search per sample (np.interp takes
    ~60 ms for a 512x512 RGB image, this a few ms; the camera pipeline evaluates curves twice per image)."""

    def __init__(self, xp: np.ndarray, fp: np.ndarray) -> None:
        xp, fp = np.asarray(xp, np.float64), np.asarray(fp, np.float64)
        self.last = len(xp) - 2
        # slopes in float64 (no division by float32 rounding of close points), evaluation in float32
        self.slope = (np.diff(fp) / np.diff(xp)).astype(np.float32)
        self.xp, self.fp = xp.astype(np.float32), fp.astype(np.float32)
        self.lo, self.hi = self.xp[0], self.xp[-1]
        steps = np.diff(xp)
        self.uniform = bool(np.allclose(steps, steps[0], rtol=1e-9, atol=0))
        span = xp[-1] - xp[0]
        # enough cells that most hold at most one table point (capped at 2^20 for near-flat curves)
        self.cells = (
            len(xp) - 1 if self.uniform else int(min(2**20, max(8 * len(xp), 2 * span / steps.min())))
        )
        self.scale = np.float32(self.cells / span)
        self.step_rise = np.diff(self.fp)  # per-segment rise, for the uniform grid's fractional position
        edges = xp[0] + np.arange(self.cells) * (span / self.cells)
        # segment holding each cell's left edge, and the next table point (queries at or past it move one
        # segment right); cells holding several points are finished by a loop
        self.start = np.clip(np.searchsorted(xp, edges, side="right") - 1, 0, self.last)
        self.next_point = np.where(
            self.start < self.last, self.xp[np.minimum(self.start + 1, self.last + 1)], np.inf
        )
        self.next_point = self.next_point.astype(np.float32)
        right = np.append(edges[1:], xp[-1])
        self.crowded = bool(np.any(xp[np.minimum(self.start + 2, self.last + 1)] < right) and len(xp) > 2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, np.float32), self.lo, self.hi)
        if self.uniform:  # segment and position inside it straight from the grid: two gathers
            position = (x - self.lo) * self.scale
            whole = np.minimum(np.floor(position), np.float32(self.last))  # float32: no int64 arithmetic
            k = whole.astype(np.intp)
            return self.fp[k] + self.step_rise[k] * (position - whole)
        cell = ((x - self.lo) * self.scale).astype(np.intp)
        np.minimum(cell, self.cells - 1, out=cell)
        k = self.start[cell] + (x >= self.next_point[cell])
        if self.crowded:
            flat_k, flat_x = k.reshape(-1), x.reshape(-1)
            todo = np.flatnonzero(self.xp[np.minimum(flat_k + 1, self.last + 1)] <= flat_x)
            todo = todo[flat_k[todo] < self.last]
            while todo.size:  # step right until the segment holds the query
                flat_k[todo] += 1
                kk = flat_k[todo]
                todo = todo[(kk < self.last) & (self.xp[np.minimum(kk + 1, self.last + 1)] <= flat_x[todo])]
        np.minimum(k, self.last, out=k)
        return self.fp[k] + self.slope[k] * (x - self.xp[k])


@dataclass(frozen=True)
class CameraResponse:
    """A tabulated camera response curve: brightness ``B`` at irradiance ``I`` (both in [0, 1], increasing).

    Args:
        irradiance: sample positions ``I``.
        brightness: curve values ``B``; non-decreasing.
        name: curve name (DoRF: film or camera and channel).
    """

    irradiance: np.ndarray
    brightness: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        i, b = np.asarray(self.irradiance, float), np.asarray(self.brightness, float)
        if i.ndim != 1 or i.shape != b.shape or i.size < 2:
            raise InputError(f"camera response {self.name!r}: I and B must be 1-D of equal length >= 2")
        if np.any(np.diff(i) <= 0) or np.any(np.diff(b) < 0):
            raise InputError(f"camera response {self.name!r}: I must increase and B must not decrease")

    @cached_property
    def _forward(self) -> _PiecewiseLinear:
        return _PiecewiseLinear(self.irradiance, self.brightness)

    @cached_property
    def _inverse(self) -> _PiecewiseLinear:
        b, keep = np.unique(np.asarray(self.brightness, float), return_index=True)
        return _PiecewiseLinear(b, np.asarray(self.irradiance, float)[keep])

    def apply(self, irradiance: np.ndarray) -> np.ndarray:
        """Irradiance -> brightness (tone mapping), linear interpolation between the samples."""
        return self._forward(irradiance)

    def invert(self, brightness: np.ndarray) -> np.ndarray:
        """Brightness -> irradiance (inverse tone mapping); flat parts of the curve map to their start."""
        return self._inverse(brightness)


@dataclass(frozen=True)
class ParametricResponse:
    """Built-in camera response family: a gamma curve with a highlight shoulder,

        B = (1 + k) u / (u + k),   u = I^(1/gamma),

    monotone with B(0) = 0, B(1) = 1, and the exact inverse I = (k B / (1 + k - B))^gamma. Large ``knee`` k
    approaches the pure gamma curve I^(1/gamma); small k compresses highlights like a film shoulder.
    :meth:`sample` draws gamma uniformly in [1.8, 2.6] and k log-uniformly in [0.3, 30], a range that covers
    sRGB-like curves (gamma 2.2, large k) and the flatter-topped curves common in the DoRF database.

    Args:
        gamma: exponent (> 0).
        knee: shoulder parameter k (> 0).
    """

    gamma: float = 2.2
    knee: float = 1e6

    def __post_init__(self) -> None:
        if self.gamma <= 0 or self.knee <= 0:
            raise InputError(f"camera response needs gamma > 0 and knee > 0, got {self.gamma}, {self.knee}")

    @property
    def name(self) -> str:
        return f"parametric(gamma={self.gamma:.3g}, knee={self.knee:.3g})"

    @staticmethod
    def sample(rng: np.random.RandomState) -> ParametricResponse:
        return ParametricResponse(
            float(rng.uniform(1.8, 2.6)), float(np.exp(rng.uniform(np.log(0.3), np.log(30))))
        )

    def apply(self, irradiance: np.ndarray) -> np.ndarray:
        u = np.power(np.clip(irradiance, 0, 1), 1.0 / self.gamma)
        return (1 + self.knee) * u / (u + self.knee)

    def invert(self, brightness: np.ndarray) -> np.ndarray:
        b = np.clip(brightness, 0, 1)
        return np.power(self.knee * b / (1 + self.knee - b), self.gamma)


def load_dorf_curves(path: str | os.PathLike) -> list[CameraResponse]:
    """Parse a DoRF ``dorfCurves.txt``: per curve a block of lines ``name``, ``type``, ``I =``, the I values,
    ``B =``, the B values (whitespace separated). Blank lines between blocks are allowed.

    Raises:
        InputError: missing file, or a block that does not follow the format (message gives the line).
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError as error:
        raise InputError(f"cannot read camera response curves {path}: {error.strerror or error}") from error
    lines_numbered = [(n + 1, line) for n, line in enumerate(lines) if line]
    curves: list[CameraResponse] = []
    for start in range(0, len(lines_numbered), 6):
        block = lines_numbered[start : start + 6]
        first = block[0][0]
        if len(block) < 6 or block[2][1].replace(" ", "") != "I=" or block[4][1].replace(" ", "") != "B=":
            raise InputError(
                f"{path}, line {first}: expected a DoRF block (name, type, 'I =', values, 'B =', values)"
            )
        try:
            i_values = np.array(block[3][1].split(), dtype=float)
            b_values = np.array(block[5][1].split(), dtype=float)
        except ValueError as error:
            raise InputError(f"{path}, line {block[3][0]}: non-numeric curve values ({error})") from error
        curves.append(CameraResponse(i_values, b_values, name=f"{block[0][1]} ({block[1][1]})"))
    if not curves:
        raise InputError(f"{path} holds no camera response curves")
    return curves


def load_crf_mat(path: str | os.PathLike) -> list[CameraResponse]:
    """Load CBDNet's ``201_CRF_data.mat`` (arrays ``I`` and ``B``, one curve per row)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        i_rows, b_rows = np.atleast_2d(mat["I"]), np.atleast_2d(mat["B"])
    except (OSError, ValueError, KeyError) as error:
        raise InputError(
            f"cannot read camera response curves from {path}: need a .mat with arrays I and B"
        ) from error
    return [CameraResponse(i, b, name=f"crf_{n}") for n, (i, b) in enumerate(zip(i_rows, b_rows))]


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


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve's inverse (IEC 61966-2-1), as in :func:`skimage.color.rgb2xyz`.

    Own two lines rather than skimage's function: fused with the colour matrix it is several times faster
    (skimage applies it through boolean-mask indexing), and the pipeline runs it on every training image."""
    return np.where(values > 0.04045, ((np.maximum(values, 0.04045) + 0.055) / 1.055) ** 2.4, values / 12.92)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve, clipped to [0, 1], as in :func:`skimage.color.xyz2rgb`."""
    encoded = np.where(
        values > 0.0031308, 1.055 * np.maximum(values, 0.0031308) ** (1 / 2.4) - 0.055, values * 12.92
    )
    return np.clip(encoded, 0, 1, out=encoded)


def _white_balance_gains(shape: tuple[int, int], pattern: str, red: float, blue: float) -> np.ndarray:
    gains = np.ones(shape, dtype=np.float32)
    for (dy, dx), colour in zip(_PHASES, pattern.upper()):
        if colour != "G":
            gains[dy::2, dx::2] = red if colour == "R" else blue
    return gains


def _camera_matrix(weights: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Convex combination of flattened XYZ->camera matrices, each row normalised to sum 1 (reference)."""
    m = (np.asarray(weights, float) / np.sum(weights)) @ matrices
    m = m.reshape(3, 3)
    return m / m.sum(axis=1, keepdims=True)


@dataclass
class CameraParameters:
    """One draw of the pipeline's random choices (also the record of what a call did)."""

    response: CameraResponse | ParametricResponse
    xyz_to_camera: np.ndarray  # (3, 3), rows summing to 1
    pattern: str
    red_gain: float  # inverse white balance factor fr in [0.75, 1]
    blue_gain: float
    sigma_s: float
    sigma_c: float


def add_raw_noise(
    raw: np.ndarray, sigma_s: float, sigma_c: float, rng: np.random.RandomState | np.random.Generator
) -> np.ndarray:
    """The reference's raw noise (``add_PG_noise``): ``clip(x + N1 * sigma_s * x + N2 * sigma_c, 0, 1)``,
    N1 and N2 independent standard normal (drawn in that order), std ``sqrt((sigma_s x)^2 + sigma_c^2)``.
    Computes in the precision of ``raw`` (float32 or float64)."""
    dtype = np.dtype(raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64)

    def normal() -> np.ndarray:
        if isinstance(rng, np.random.Generator):
            return rng.standard_normal(raw.shape, dtype=dtype)
        return rng.standard_normal(raw.shape).astype(dtype, copy=False)

    noisy = raw.astype(dtype) + normal() * (dtype.type(sigma_s) * raw)
    noisy += normal() * dtype.type(sigma_c)
    return np.clip(noisy, 0, 1, out=noisy)


def run_camera_pipeline(
    srgb: np.ndarray,
    params: CameraParameters,
    rng: np.random.RandomState | np.random.Generator | None = None,
    srgb_transfer: bool = True,
    bayer: bool = True,
    return_clean: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Push an (H, W, 3) sRGB image in [0, 1] through the inverse ISP, raw noise and the ISP.

    Args:
        srgb: (H, W, 3) float image in [0, 1].
        params: the camera (curve, matrix, pattern, gains) and noise levels.
        rng: generator of the raw noise; needed unless both sigmas are 0.
        srgb_transfer: convert RGB <-> XYZ as skimage's ``rgb2xyz``/``xyz2rgb`` do, applying the sRGB
            transfer curve on top of the camera response (the reference's behaviour); False: the plain
            linear-RGB matrices.
        bayer: mosaic and demosaic (False: a three-sensor camera, noise on every channel; demosaicing is
            the one step of the chain that is not invertible, so False isolates its error).
        return_clean: also develop the noise-free raw image (doubles the forward half of the work).

    Returns:
        ``(noisy, clean)``: (H, W, 3) float32 in [0, 1]; ``clean`` went through the same pipeline without
        noise (None unless ``return_clean``).
    """
    # float32 throughout: half the memory traffic; the errors (1e-7) are far below 16-bit steps
    srgb = np.clip(np.asarray(srgb, dtype=np.float32), 0, 1)
    linear = np.asarray(params.response.invert(srgb), dtype=np.float32)
    to_camera = params.xyz_to_camera.astype(np.float32)
    if srgb_transfer:
        linear = srgb_to_linear(linear)
    camera = np.clip(linear @ (to_camera @ xyz_from_rgb.astype(np.float32)).T, 0, 1)
    shape = camera.shape[:2]
    if bayer:
        gains = _white_balance_gains(shape, params.pattern, params.red_gain, params.blue_gain).astype(
            np.float32
        )
        raw = mosaic(camera, params.pattern) * gains
    else:
        gains = np.array([params.red_gain, 1.0, params.blue_gain], dtype=np.float32)
        raw = camera * gains
    if params.sigma_s > 0 or params.sigma_c > 0:
        if rng is None:
            raise ValueError("a random generator is needed to add noise")
        noisy_raw = add_raw_noise(raw, params.sigma_s, params.sigma_c, rng).astype(np.float32)
    else:
        noisy_raw = raw
    camera_to_xyz = np.linalg.inv(params.xyz_to_camera).astype(np.float32)
    xyz_to_rgb = rgb_from_xyz.astype(np.float32)

    def develop(raw_image: np.ndarray) -> np.ndarray:
        balanced = raw_image / gains
        np.clip(balanced, 0, 1, out=balanced)
        cam = demosaic_malvar(balanced, params.pattern) if bayer else balanced
        np.clip(cam, 0, 1, out=cam)
        xyz_back = cam @ camera_to_xyz.T
        np.clip(xyz_back, 0, 1, out=xyz_back)
        linear_back = xyz_back @ xyz_to_rgb.T
        linear_back = linear_to_srgb(linear_back) if srgb_transfer else np.clip(linear_back, 0, 1)
        out = params.response.apply(linear_back)
        return np.clip(out, 0, 1, out=out)

    noisy = develop(noisy_raw)
    if not return_clean:
        return noisy, None
    return noisy, (noisy if noisy_raw is raw else develop(raw))


class CameraPipelineNoise(Randomizable, Transform):
    """Realistic sRGB noise: a random camera pipeline run backwards to raw, Poisson-Gaussian noise, forwards.

    Args:
        noise: "fixed" (sigma_s 0.04, sigma_c 0.03: the paper's sRGB training data), "random" (log-uniform
            levels up to 0.16 and 0.06), "off" (no noise: the pipeline's own round-trip error), or a tuple
            ``(sigma_s, sigma_c)``.
        responses: camera response curves to draw from (e.g. :func:`load_dorf_curves`); ``None``: a fresh
            :class:`ParametricResponse` per call.
        matrices: XYZ->camera matrices (rows of 9 numbers) mixed with random convex weights; default
            :data:`XYZ_TO_CAMERA_MATRICES`.
        patterns: Bayer patterns to draw from.
        gain_range: range of the inverse white-balance factors (reference: 0.75 to 1).
        fixed_seed: reset the generator to this seed before every call (reproducible per image), or None.
        srgb_transfer: see :func:`run_camera_pipeline` (True: as the reference).
        bayer: see :func:`run_camera_pipeline` (True: as the reference).

    Input: (3, H, W) sRGB in [0, 1] (numpy, torch or MetaTensor). Output: the noisy image, same type,
    float32. :meth:`simulate` also returns the noise-free pipeline output; ``self.params`` is the last draw.
    """

    def __init__(
        self,
        noise: str | tuple[float, float] = "fixed",
        responses: Sequence[CameraResponse | ParametricResponse] | None = None,
        matrices: Sequence[Sequence[float]] | None = None,
        patterns: Sequence[str] = BAYER_PATTERNS,
        gain_range: tuple[float, float] = (0.75, 1.0),
        fixed_seed: int | None = None,
        srgb_transfer: bool = True,
        bayer: bool = True,
    ) -> None:
        if isinstance(noise, str) and noise not in ("fixed", "random", "off"):
            raise InputError(f"noise must be 'fixed', 'random', 'off' or (sigma_s, sigma_c), got {noise!r}")
        self.noise = noise if isinstance(noise, str) else (float(noise[0]), float(noise[1]))
        self.responses = list(responses) if responses is not None else None
        if self.responses is not None and not self.responses:
            raise InputError("responses is empty; pass curves or None for the built-in family")
        self.matrices = np.asarray(
            list(XYZ_TO_CAMERA_MATRICES.values()) if matrices is None else matrices, dtype=float
        ).reshape(-1, 9)
        self.patterns = tuple(p.upper() for p in patterns)
        for p in self.patterns:
            bayer_masks((2, 2), p)  # validates
        self.gain_range = gain_range
        self.fixed_seed = fixed_seed
        self.srgb_transfer = srgb_transfer
        self.bayer = bayer
        self.params: CameraParameters | None = None

    def randomize(self, data: Any = None) -> None:
        if self.responses is None:
            response = ParametricResponse.sample(self.R)
        else:
            response = self.responses[self.R.randint(len(self.responses))]
        matrix = _camera_matrix(self.R.random_sample(len(self.matrices)), self.matrices)
        pattern = self.patterns[self.R.randint(len(self.patterns))]
        red, blue = self.R.uniform(*self.gain_range, size=2)
        if self.noise == "fixed":
            sigma_s, sigma_c = FIXED_NOISE
        elif self.noise == "off":
            sigma_s, sigma_c = 0.0, 0.0
        elif self.noise == "random":
            low = np.log(1e-4)
            sigma_s, sigma_c = (
                float(np.exp(low + self.R.rand() * (np.log(top) - low))) for top in RANDOM_NOISE_MAX
            )
        else:
            sigma_s, sigma_c = self.noise
        self.params = CameraParameters(response, matrix, pattern, float(red), float(blue), sigma_s, sigma_c)

    def simulate(self, img: Any, return_clean: bool = True) -> tuple[Any, Any]:
        """``(noisy, clean)`` for a (3, H, W) image; ``clean`` is the noise-free pipeline output (None
        when not ``return_clean``)."""
        array = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
        if array.ndim != 3 or array.shape[0] != 3:
            raise InputError(f"the camera pipeline needs an RGB image (3, H, W), got shape {array.shape}")
        if self.fixed_seed is not None:
            self.set_random_state(seed=self.fixed_seed)
        self.randomize()
        # the raw noise comes from a Generator seeded by this transform's RandomState (MONAI's generator):
        # reproducible with set_random_state, and its float32 normals are ~3x faster than RandomState's
        noise_rng = np.random.default_rng(self.R.randint(0, 2**31 - 1, size=4))
        noisy, clean = run_camera_pipeline(
            np.moveaxis(array, 0, -1),
            self.params,
            noise_rng,
            srgb_transfer=self.srgb_transfer,
            bayer=self.bayer,
            return_clean=return_clean,
        )
        return tuple(
            None
            if x is None
            else convert_to_dst_type(np.ascontiguousarray(np.moveaxis(x, -1, 0)), img, dtype=np.float32)[0]
            for x in (noisy, clean)
        )

    def __call__(self, img: Any) -> Any:
        return self.simulate(img, return_clean=False)[0]


class CameraPipelineNoised(Randomizable, MapTransform):
    """Dictionary version of :class:`CameraPipelineNoise`: reads the clean image, writes a noisy one.

    Args:
        keys: key of the clean sRGB image (one key).
        noisy_key: key written with the noisy image.
        clean_target: "input" keeps the clean image as it is (the reference trains on the original image
            against the pipeline's noisy output); "pipeline" replaces it by the noise-free pipeline output,
            so that the pair differs by noise only.
        allow_missing_keys: do not raise for a missing key.
        kwargs: arguments of :class:`CameraPipelineNoise`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        noisy_key: str = "noisy",
        clean_target: str = "input",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise InputError(f"CameraPipelineNoised takes one clean-image key, got {list(self.keys)}")
        if clean_target not in ("input", "pipeline"):
            raise InputError(f"clean_target must be 'input' or 'pipeline', got {clean_target!r}")
        self.noisy_key = noisy_key
        self.clean_target = clean_target
        self.pipeline = CameraPipelineNoise(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.pipeline.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draws happen in the array transform."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            noisy, clean = self.pipeline.simulate(d[key], return_clean=self.clean_target == "pipeline")
            d[self.noisy_key] = noisy
            if self.clean_target == "pipeline":
                d[key] = clean
        return d
