"""PSNR, SSIM and RMSE of CT slices under named evaluation protocols.

Published low-dose CT numbers are only comparable under the protocol they were computed with, so every
metric here is tied to one:

- ``"paper"``: the CLIPDenoising paper (and its reference code ``basicsr/metrics/CT_psnr_ssim.py``): HU
  truncated to [-1024, 3072], data range 4096, SSIM with an 11x11 Gaussian window (sigma 1.5) and zero
  padding to "same" size, C1 = (0.01 R)^2, C2 = (0.03 R)^2, mean over the whole slice.
- ``"redcnn"``: the RED-CNN line of papers: HU truncated to [-160, 240], data range 400, same SSIM.
- ``"ldctbench"``: LDCTBench: HU windowed per anatomy (chest -600/1500, abdomen 50/400, head 40/80,
  centre/width) and scaled to [0, 1]; PSNR with data range 1; SSIM with scikit-image's defaults (7x7
  uniform window, sample covariance, data range 1, mean over the slice without the 3-pixel border);
  RMSE on HU clipped to [-1024, 1900].

Metrics are computed per 2D slice on tensors shaped (B, 1, H, W); a batch yields one value per slice.
"paper" and "redcnn" compute in float32 like the reference code (and reproduce its numbers exactly),
"ldctbench" in float64 like scikit-image.

The scores are available three ways: functions (``compute_ct_metrics``), MONAI metrics
(``CTPSNRMetric``/``CTSSIMMetric``/``CTRMSEMetric``, ``CumulativeIterationMetric`` subclasses) and ignite
handlers for MONAI workflows (``CTPSNR``/``CTSSIM``/``CTRMSE``, ``IgniteMetricHandler`` subclasses).
``MetricTable`` collects per-slice rows with a patient id and writes CSV and JSON summaries.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ldct_clip.errors import InputError

__all__ = [
    "PROTOCOLS",
    "LDCTBENCH_WINDOWS",
    "MODEL_RANGE",
    "MetricProtocol",
    "get_protocol",
    "model_range_to_hu",
    "ssim_map",
    "psnr",
    "ssim",
    "rmse",
    "compute_ct_metrics",
    "CTMetric",
    "CTPSNRMetric",
    "CTSSIMMetric",
    "CTRMSEMetric",
    "CTPSNR",
    "CTSSIM",
    "CTRMSE",
    "MetricTable",
]

#: HU interval that the model range [0, 1] maps to: x = (HU + 1024) / 4096.
MODEL_RANGE = (-1024.0, 3072.0)

#: LDCTBench display windows, (centre, width) in HU.
LDCTBENCH_WINDOWS = {"chest": (-600.0, 1500.0), "abdomen": (50.0, 400.0), "head": (40.0, 80.0)}

METRIC_NAMES = ("psnr", "ssim", "rmse")


@dataclass(frozen=True)
class MetricProtocol:
    """How a protocol turns HU slices into the arrays it scores.

    Args:
        name: protocol name.
        trunc: HU interval the slices are truncated to before PSNR and SSIM.
        data_range: data range R of PSNR and SSIM, in the units of the scored arrays.
        ssim_window: "gaussian11" (11x11 Gaussian, sigma 1.5, zero "same" padding, population variance,
            mean over the whole slice: the reference code) or "uniform7" (scikit-image's defaults).
        rmse_clip: HU interval the slices are clipped to before the RMSE.
        windowed: scale the truncated slices to [0, 1] (LDCTBench); then ``data_range`` is 1.
        dtype: working precision. "float32" for the reference's protocols: it computes in float32, and
            float64 differs from its numbers by ~2e-6 (more than the 1e-6 we promise to reproduce);
            "float64" for LDCTBench, whose scikit-image computes in float64.
    """

    name: str
    trunc: tuple[float, float]
    data_range: float
    ssim_window: str
    rmse_clip: tuple[float, float]
    windowed: bool = False
    dtype: str = "float32"


PROTOCOLS: dict[str, MetricProtocol] = {
    "paper": MetricProtocol("paper", (-1024.0, 3072.0), 4096.0, "gaussian11", (-1024.0, 3072.0)),
    "redcnn": MetricProtocol("redcnn", (-160.0, 240.0), 400.0, "gaussian11", (-160.0, 240.0)),
}


def get_protocol(protocol: str | MetricProtocol, anatomy: str = "abdomen") -> MetricProtocol:
    """The protocol called ``protocol`` (``anatomy`` picks the window of ``"ldctbench"``).

    Raises:
        InputError: unknown protocol or anatomy.
    """
    if isinstance(protocol, MetricProtocol):
        return protocol
    if protocol == "ldctbench":
        if anatomy not in LDCTBENCH_WINDOWS:
            raise InputError(
                f"unknown anatomy {anatomy!r} for the ldctbench protocol: use one of {sorted(LDCTBENCH_WINDOWS)}"
            )
        centre, width = LDCTBENCH_WINDOWS[anatomy]
        return MetricProtocol(
            f"ldctbench-{anatomy}",
            (centre - width / 2, centre + width / 2),
            1.0,
            "uniform7",
            (-1024.0, 1900.0),
            windowed=True,
            dtype="float64",
        )
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown metric protocol {protocol!r}: use one of paper, redcnn, ldctbench")
    return PROTOCOLS[protocol]


def model_range_to_hu(x: torch.Tensor, norm_range: Sequence[float] = MODEL_RANGE) -> torch.Tensor:
    """x in the model range back to HU: ``x * (max - min) + min``.

    ``norm_range=(-1024, 3096)`` reproduces the reference test script's denormalisation slip (~ -0.05 dB).
    """
    low, high = norm_range
    return x * (high - low) + low


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    # normalised in the working dtype, as the reference does, so float32 results match it bit for bit
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2)).to(dtype)
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, window: str = "gaussian11") -> torch.Tensor:
    """Per-pixel SSIM of (B, 1, H, W) slices.

    MONAI's ``SSIMMetric`` is not used: it filters with "valid" convolution and no sample-covariance
    correction, whereas the reference CT code zero-pads to "same" size (``"gaussian11"``) and
    scikit-image's defaults use the sample covariance N/(N-1) (``"uniform7"``). For ``"uniform7"`` the
    returned map is the "valid" part, which is exactly the region scikit-image averages (it crops
    (7-1)//2 pixels from each border), so the padding mode it filters with never matters.
    """
    if window == "gaussian11":
        kernel = _gaussian_window(11, 1.5, x.dtype)
        padding, cov_norm = 5, 1.0
    elif window == "uniform7":
        kernel = torch.full((7, 7), 1.0 / 49, dtype=x.dtype)
        padding, cov_norm = 0, 49.0 / 48.0
    else:
        raise InputError(f"unknown SSIM window {window!r}: use gaussian11 or uniform7")
    kernel = kernel.to(device=x.device, dtype=x.dtype)[None, None]

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, padding=padding)

    mu_x, mu_y = filt(x), filt(y)
    var_x = cov_norm * (filt(x * x) - mu_x * mu_x)
    var_y = cov_norm * (filt(y * y) - mu_y * mu_y)
    cov_xy = cov_norm * (filt(x * y) - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def _as_slices(t: torch.Tensor, dtype: str = "float64") -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise InputError(
            f"metrics expect slices shaped (B, 1, H, W), (B, H, W) or (H, W), got {tuple(t.shape)}"
        )
    return t.as_tensor().to(getattr(torch, dtype)) if hasattr(t, "as_tensor") else t.to(getattr(torch, dtype))


def _slice_means(t: torch.Tensor) -> torch.Tensor:
    # one full reduction per slice rather than a batched .mean(1): float32 sums depend on the reduction
    # order, and this is the order of the reference's per-slice .mean()
    return torch.stack([s.mean() for s in t])


def _scored(hu: torch.Tensor, proto: MetricProtocol) -> torch.Tensor:
    low, high = proto.trunc
    t = hu.clamp(low, high)
    return (t - low) / (high - low) if proto.windowed else t


def _scored_pair(
    pred_hu: torch.Tensor, target_hu: torch.Tensor, proto: MetricProtocol
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = (_scored(_as_slices(t, proto.dtype), proto) for t in (pred_hu, target_hu))
    return pred, target


def psnr(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | MetricProtocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """PSNR (dB) per slice of HU slices under ``protocol``; shape (B,)."""
    proto = get_protocol(protocol, anatomy)
    a, b = _scored_pair(pred_hu, target_hu, proto)
    mse = _slice_means((a - b) ** 2)
    # log10 in the working dtype, the factor 10 in float64: the reference computes
    # ``10 * torch.log10(R**2 / mse).item()``, so its float32 PSNRs are 10 x a float32 number
    return 10 * torch.log10(proto.data_range**2 / mse).double()


def ssim(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | MetricProtocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """SSIM per slice of HU slices under ``protocol``; shape (B,)."""
    proto = get_protocol(protocol, anatomy)
    a, b = _scored_pair(pred_hu, target_hu, proto)
    return _slice_means(ssim_map(a, b, proto.data_range, proto.ssim_window))


def rmse(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | MetricProtocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """RMSE (HU) per slice of HU slices, clipped to the protocol's RMSE interval; shape (B,)."""
    proto = get_protocol(protocol, anatomy)
    low, high = proto.rmse_clip
    a = _as_slices(pred_hu, proto.dtype).clamp(low, high)
    b = _as_slices(target_hu, proto.dtype).clamp(low, high)
    return _slice_means((a - b) ** 2).sqrt()


_METRIC_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"psnr": psnr, "ssim": ssim, "rmse": rmse}


def compute_ct_metrics(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | MetricProtocol = "paper",
    anatomy: str = "abdomen",
) -> dict[str, torch.Tensor]:
    """``{"psnr", "ssim", "rmse"}``, each a (B,) tensor of per-slice values, for HU slices."""
    return {name: fn(pred_hu, target_hu, protocol, anatomy) for name, fn in _METRIC_FUNCTIONS.items()}


class CTMetric(CumulativeIterationMetric):
    """One CT metric under a protocol, as a MONAI cumulative metric (per-slice values, reduced on aggregate).

    Args:
        metric: "psnr", "ssim" or "rmse".
        protocol: "paper", "redcnn" or "ldctbench".
        anatomy: window of the "ldctbench" protocol: "chest", "abdomen" or "head".
        input_range: "model" when ``y_pred``/``y`` are in the model range x = (HU+1024)/4096 (training
            validation), "hu" when they are HU.
        norm_range: HU interval of the model range (``(-1024, 3096)`` reproduces the reference test script).
        reduction: MONAI reduction over the collected per-slice values.
        get_not_nans: also return the not-nan count from ``aggregate``.
    """

    def __init__(
        self,
        metric: str,
        protocol: str = "paper",
        anatomy: str = "abdomen",
        input_range: str = "model",
        norm_range: Sequence[float] = MODEL_RANGE,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        if metric not in _METRIC_FUNCTIONS:
            raise InputError(f"unknown CT metric {metric!r}: use one of {', '.join(METRIC_NAMES)}")
        if input_range not in ("model", "hu"):
            raise InputError(f"input_range must be 'model' or 'hu', got {input_range!r}")
        self.metric = metric
        self.protocol = get_protocol(protocol, anatomy)
        self.input_range = input_range
        self.norm_range = tuple(float(v) for v in norm_range)
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _to_hu(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_slices(t, self.protocol.dtype)
        return model_range_to_hu(t, self.norm_range) if self.input_range == "model" else t

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise InputError(
                f"prediction and target shapes differ: {tuple(y_pred.shape)} vs {tuple(y.shape)}"
            )
        values = _METRIC_FUNCTIONS[self.metric](self._to_hu(y_pred), self._to_hu(y), self.protocol)
        return values[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch tensor")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


class CTPSNRMetric(CTMetric):
    """PSNR (dB) under a protocol as a MONAI metric; arguments as :class:`CTMetric` minus ``metric``."""

    def __init__(self, protocol: str = "paper", **kwargs) -> None:
        super().__init__("psnr", protocol, **kwargs)


class CTSSIMMetric(CTMetric):
    """SSIM under a protocol as a MONAI metric; arguments as :class:`CTMetric` minus ``metric``."""

    def __init__(self, protocol: str = "paper", **kwargs) -> None:
        super().__init__("ssim", protocol, **kwargs)


class CTRMSEMetric(CTMetric):
    """RMSE (HU) under a protocol as a MONAI metric; arguments as :class:`CTMetric` minus ``metric``."""

    def __init__(self, protocol: str = "paper", **kwargs) -> None:
        super().__init__("rmse", protocol, **kwargs)


class _CTMetricHandler(IgniteMetricHandler):
    metric_class: type[CTMetric]

    def __init__(
        self,
        protocol: str = "paper",
        anatomy: str = "abdomen",
        input_range: str = "model",
        norm_range: Sequence[float] = MODEL_RANGE,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        metric_fn = self.metric_class(
            protocol=protocol, anatomy=anatomy, input_range=input_range, norm_range=norm_range
        )
        if output_transform is None:
            output_transform = from_engine(["pred", "label"])
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class CTPSNR(_CTMetricHandler):
    """Ignite handler for MONAI workflows: mean PSNR (dB) over the evaluated slices under a protocol.

    Args:
        protocol: "paper", "redcnn" or "ldctbench".
        anatomy: window of "ldctbench".
        input_range: "model" (x = (HU+1024)/4096) or "hu".
        norm_range: HU interval of the model range.
        output_transform: picks (y_pred, y) from ``engine.state.output`` (default: its "pred" and "label").
        save_details: keep the per-slice values in ``engine.state.metric_details``.
    """

    metric_class = CTPSNRMetric


class CTSSIM(_CTMetricHandler):
    """Ignite handler: mean SSIM under a protocol; arguments as :class:`CTPSNR`."""

    metric_class = CTSSIMMetric


class CTRMSE(_CTMetricHandler):
    """Ignite handler: mean RMSE (HU) under a protocol; arguments as :class:`CTPSNR`."""

    metric_class = CTRMSEMetric


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


class MetricTable:
    """Per-slice metric rows with patient ids; per-patient and overall means; CSV and JSON output.

    The overall mean is over all slices (as the reference evaluation averages), the per-patient means over
    each patient's slices.

    Args:
        protocol: protocol name written into the summary.
        groups: names of the scored images, e.g. ``("input", "denoised")``.
    """

    def __init__(self, protocol: str, groups: Sequence[str] = ("input", "denoised")) -> None:
        self.protocol = protocol
        self.groups = tuple(groups)
        self.rows: list[dict] = []

    def add(self, patient: str, slice_index: int, values: Mapping[str, Mapping[str, float]]) -> None:
        """Add one slice: ``values[group][metric]`` for every group and metric."""
        row: dict = {"patient": patient, "slice": int(slice_index)}
        for group in self.groups:
            for name in METRIC_NAMES:
                row[f"{group}_{name}"] = float(values[group][name])
        self.rows.append(row)

    def add_batch(
        self, patient: str, first_slice: int, values: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        """Add the slices of a batch: ``values[group][metric]`` a (B,) tensor (``compute_ct_metrics``)."""
        n = len(next(iter(values[self.groups[0]].values())))
        for i in range(n):
            self.add(
                patient,
                first_slice + i,
                {g: {m: values[g][m][i].item() for m in METRIC_NAMES} for g in self.groups},
            )

    def _means(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        return {g: {m: _mean(r[f"{g}_{m}"] for r in rows) for m in METRIC_NAMES} for g in self.groups}

    def summary(self) -> dict:
        """``{"protocol", "n_slices", <group>: {"psnr","ssim","rmse"}, ..., "per_patient": {id: {...}}}``."""
        out: dict = {"protocol": self.protocol, "n_slices": len(self.rows)}
        out.update(self._means(self.rows))
        patients = sorted({r["patient"] for r in self.rows})
        out["per_patient"] = {}
        for p in patients:
            rows = [r for r in self.rows if r["patient"] == p]
            out["per_patient"][p] = {"n_slices": len(rows), **self._means(rows)}
        return out

    def write_csv(self, path: str | Path) -> None:
        """One row per slice: patient, slice, then ``<group>_<metric>`` columns."""
        columns = ["patient", "slice"] + [f"{g}_{m}" for g in self.groups for m in METRIC_NAMES]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def write_json(self, path: str | Path) -> None:
        """The :meth:`summary` as JSON."""
        Path(path).write_text(json.dumps(self.summary(), indent=2) + "\n")

    def format_table(self) -> str:
        """A plain-text table of the per-patient and overall means, for the terminal."""
        summary = self.summary()
        head = f"{'patient':<16}{'slices':>7}" + "".join(
            f"{g + ' ' + m:>18}" for g in self.groups for m in METRIC_NAMES
        )
        lines = [f"protocol: {self.protocol}", head]

        def line(name: str, n: int, means: Mapping) -> str:
            cells = "".join(f"{means[g][m]:>18.4f}" for g in self.groups for m in METRIC_NAMES)
            return f"{name:<16}{n:>7}{cells}"

        for p, means in summary["per_patient"].items():
            lines.append(line(p, means["n_slices"], means))
        lines.append(line("all", summary["n_slices"], summary))
        return "\n".join(lines)
