"""Camera response curves of the camera pipeline (``ldct_clip.transforms.isp``): brightness as a function of
irradiance, applied and inverted on whole images.

:class:`ParametricResponse` (built in, see its docstring) or the 201 measured curves of the DoRF database
(Grossberg & Nayar) that CBDNet uses, loaded from the user's ``dorfCurves.txt`` (:func:`load_dorf_curves`)
or CBDNet's ``201_CRF_data.mat`` (:func:`load_crf_mat`). They are not shipped.

Tabulated curves are evaluated by linear interpolation (the reference looks up the nearest of 1024 bins, a
quantisation of up to 1/2048), in float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from ldct_clip.errors import InputError

__all__ = ["CameraResponse", "ParametricResponse", "load_crf_mat", "load_dorf_curves"]


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
    try:
        mat = loadmat(str(path))
        i_rows, b_rows = np.atleast_2d(mat["I"]), np.atleast_2d(mat["B"])
    except (OSError, ValueError, KeyError) as error:
        raise InputError(
            f"cannot read camera response curves from {path}: need a .mat with arrays I and B"
        ) from error
    return [CameraResponse(i, b, name=f"crf_{n}") for n, (i, b) in enumerate(zip(i_rows, b_rows))]
