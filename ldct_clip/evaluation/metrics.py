"""PSNR, SSIM and RMSE under the protocols of :mod:`ldct_clip.evaluation.protocols`, as functions, one MONAI
metric and one ignite handler.

CT scores are computed per 2D slice on HU tensors shaped (B, 1, H, W): a batch yields one value per
slice. "paper" and "redcnn" compute in float32 like the reference code (and reproduce its numbers exactly),
"ldctbench-*" in float64 like scikit-image. RGB scores are computed per (C, H, W) image in float64.

Own SSIM code rather than MONAI's ``SSIMMetric``: MONAI filters with "valid" convolution, without the
sample-covariance correction and in float32, whereas the reference CT code zero-pads to "same" size,
scikit-image's defaults use the sample covariance N/(N-1), and the MATLAB/BasicSR numbers of the RGB
protocols are float64 (MONAI's float32 moves them by about 5e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction
from scipy.ndimage import correlate1d

from ldct_clip.conventions import HU_RANGE, model_to_hu
from ldct_clip.errors import InputError
from ldct_clip.evaluation.protocols import CTProtocol, Protocol, RGBProtocol, get_protocol

__all__ = [
    "MetricHandler",
    "ProtocolMetric",
    "compute_ct_metrics",
    "psnr",
    "psnr_255",
    "rgb_metrics",
    "rmse",
    "score",
    "ssim",
    "ssim_map",
    "ssim_matlab",
    "to_255",
]


# ---------------------------------------------------------------------------------------------- CT slices


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    # normalised in the working dtype, as the reference does, so float32 results match it bit for bit
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2)).to(dtype)
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, window: str = "gaussian11") -> torch.Tensor:
    """Per-pixel SSIM of (B, 1, H, W) slices.

    ``"gaussian11"`` zero-pads to "same" size (the reference CT code); for ``"uniform7"`` (scikit-image's
    defaults, sample covariance) the returned map is the "valid" part, which is exactly the region
    scikit-image averages (it crops (7-1)//2 pixels from each border), so the padding it filters with never
    matters.
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


def _as_slices(t: torch.Tensor | np.ndarray, dtype: str = "float64") -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise InputError(
            f"metrics expect slices shaped (B, 1, H, W), (B, H, W) or (H, W), got {tuple(t.shape)}"
        )
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    return t.to(getattr(torch, dtype))


def _slice_means(t: torch.Tensor) -> torch.Tensor:
    # one full reduction per slice rather than a batched .mean(1): float32 sums depend on the reduction
    # order, and this is the order of the reference's per-slice .mean()
    return torch.stack([s.mean() for s in t])


def _ct(protocol: str | Protocol, anatomy: str) -> CTProtocol:
    proto = get_protocol(protocol, anatomy)
    if not isinstance(proto, CTProtocol):
        raise InputError(
            f"protocol {proto.name!r} scores RGB images, not CT slices: use paper, redcnn or ldctbench"
        )
    return proto


def _scored_pair(
    pred_hu: torch.Tensor, target_hu: torch.Tensor, proto: CTProtocol
) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = proto.trunc

    def scored(hu: torch.Tensor) -> torch.Tensor:
        t = _as_slices(hu, proto.dtype).clamp(low, high)
        return (t - low) / (high - low) if proto.windowed else t

    return scored(pred_hu), scored(target_hu)


def psnr(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | Protocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """PSNR (dB) per slice of HU slices under a CT ``protocol``; shape (B,)."""
    proto = _ct(protocol, anatomy)
    a, b = _scored_pair(pred_hu, target_hu, proto)
    mse = _slice_means((a - b) ** 2)
    # log10 in the working dtype, the factor 10 in float64: the reference computes
    # ``10 * torch.log10(R**2 / mse).item()``, so its float32 PSNRs are 10 x a float32 number
    return 10 * torch.log10(proto.data_range**2 / mse).double()


def ssim(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | Protocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """SSIM per slice of HU slices under a CT ``protocol``; shape (B,)."""
    proto = _ct(protocol, anatomy)
    a, b = _scored_pair(pred_hu, target_hu, proto)
    return _slice_means(ssim_map(a, b, proto.data_range, proto.ssim_window))


def rmse(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | Protocol = "paper",
    anatomy: str = "abdomen",
) -> torch.Tensor:
    """RMSE (HU) per slice of HU slices, clipped to the protocol's RMSE interval; shape (B,)."""
    proto = _ct(protocol, anatomy)
    low, high = proto.rmse_clip
    a = _as_slices(pred_hu, proto.dtype).clamp(low, high)
    b = _as_slices(target_hu, proto.dtype).clamp(low, high)
    return _slice_means((a - b) ** 2).sqrt()


_CT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"psnr": psnr, "ssim": ssim, "rmse": rmse}


def compute_ct_metrics(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    protocol: str | Protocol = "paper",
    anatomy: str = "abdomen",
) -> dict[str, torch.Tensor]:
    """``{"psnr", "ssim", "rmse"}``, each a (B,) tensor of per-slice values, for HU slices."""
    return {name: fn(pred_hu, target_hu, protocol, anatomy) for name, fn in _CT_FUNCTIONS.items()}


# -------------------------------------------------------------------------------------------- RGB images


def to_255(image: torch.Tensor | np.ndarray, rounding: bool) -> np.ndarray:
    """Clamp to [0, 1], scale to [0, 255] as float64, and round to integers when ``rounding``."""
    array = (
        image.detach().cpu().double().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, np.float64)
    )
    scaled = np.clip(array, 0.0, 1.0) * 255.0
    return np.round(scaled) if rounding else scaled


def psnr_255(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR with peak 255 over all samples (``inf`` for identical images)."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise InputError(f"PSNR of images of different shapes {reference.shape} and {test.shape}")
    mse = np.mean((reference - test) ** 2)
    return math.inf if mse == 0 else 20.0 * math.log10(255.0 / math.sqrt(mse))


def ssim_matlab(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """MATLAB-style SSIM of (C, H, W) or (H, W) images: valid-region mean per channel, averaged.

    Args:
        reference: clean image, float values on a ``data_range`` scale.
        test: image compared with it, same shape.
        data_range: peak value (255 for the RGB protocols).
    """
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise InputError(f"SSIM of images of different shapes {reference.shape} and {test.shape}")
    if reference.ndim == 2:
        reference, test = reference[None], test[None]
    if min(reference.shape[-2:]) < 11:
        raise InputError(f"SSIM needs images of at least 11x11 pixels, got {reference.shape[-2:]}")
    offsets = np.arange(11) - 5.0
    window = np.exp(-(offsets**2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def local_mean(x: np.ndarray) -> np.ndarray:
        # separable correlation; only the valid region (the window inside the image) is kept
        return correlate1d(correlate1d(x, window, axis=-1), window, axis=-2)[..., 5:-5, 5:-5]

    values = []
    for x, y in zip(reference, test):
        mu_x, mu_y = local_mean(x), local_mean(y)
        var_x = local_mean(x * x) - mu_x**2
        var_y = local_mean(y * y) - mu_y**2
        cov = local_mean(x * y) - mu_x * mu_y
        ssim_values = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )
        values.append(ssim_values.mean())
    return float(np.mean(values))


def _rgb(protocol: str | Protocol) -> RGBProtocol:
    proto = get_protocol(protocol)
    if not isinstance(proto, RGBProtocol):
        raise InputError(f"protocol {proto.name!r} scores CT slices, not RGB images: use synthetic or srgb")
    return proto


def rgb_metrics(
    clean: torch.Tensor | np.ndarray,
    output: torch.Tensor | np.ndarray,
    protocol: str | Protocol = "synthetic",
) -> dict[str, float]:
    """PSNR and SSIM of a (C, H, W) image in [0, 1] against the clean one, under an RGB protocol.

    Args:
        clean: clean image in [0, 1] (for "srgb" normally k/255 values read from an 8-bit file).
        output: denoised (or noisy) image, any range: it is clamped to [0, 1].
        protocol: "synthetic" (x255, no rounding) or "srgb" (x255, rounded to uint8).

    Returns:
        ``{"psnr": dB, "ssim": value}``.
    """
    proto = _rgb(protocol)
    reference, test = to_255(clean, proto.rounding), to_255(output, proto.rounding)
    return {"psnr": psnr_255(reference, test), "ssim": ssim_matlab(reference, test, proto.peak)}


# ------------------------------------------------------------------------------------------ any protocol


def score(
    y_pred: torch.Tensor, y: torch.Tensor, metric: str, protocol: str | Protocol, anatomy: str = "abdomen"
) -> torch.Tensor:
    """One metric per item under any protocol: per (1, H, W) HU slice for CT, per (C, H, W) image in [0, 1]
    for RGB; shape (B,).

    Raises:
        InputError: a metric the protocol does not have, or shapes that differ.
    """
    proto = get_protocol(protocol, anatomy)
    if metric not in proto.metric_names:
        raise InputError(
            f"protocol {proto.name} has no metric {metric!r}: use {', '.join(proto.metric_names)}"
        )
    if y_pred.shape != y.shape:
        raise InputError(f"prediction and target shapes differ: {tuple(y_pred.shape)} vs {tuple(y.shape)}")
    if isinstance(proto, CTProtocol):
        return _CT_FUNCTIONS[metric](y_pred, y, proto)
    if y_pred.dim() == 3:
        y_pred, y = y_pred[None], y[None]
    values = [rgb_metrics(t, p, proto)[metric] for p, t in zip(y_pred, y)]
    return torch.tensor(values, dtype=torch.float64)


class ProtocolMetric(CumulativeIterationMetric):
    """One metric under one protocol (CT or RGB) as a MONAI cumulative metric: a value per slice or image,
    reduced on ``aggregate``.

    Args:
        metric: "psnr", "ssim" or (CT) "rmse".
        protocol: a name of :data:`~ldct_clip.evaluation.protocols.PROTOCOLS` ("paper", "redcnn",
            "ldctbench-abdomen"..., "synthetic", "srgb") or "ldctbench" with ``anatomy``.
        anatomy: window of "ldctbench": "chest", "abdomen" or "head".
        input_range: "model" when ``y_pred``/``y`` are in the network's range (CT: x = (HU+1024)/4096, the
            training validation; RGB: [0, 1]), "hu" when CT tensors are in HU.
        norm_range: HU interval of the CT model range (``(-1024, 3096)`` reproduces the reference test
            script's denormalisation slip).
        reduction: MONAI reduction over the collected per-item values.
        get_not_nans: also return the not-nan count from ``aggregate``.
    """

    def __init__(
        self,
        metric: str,
        protocol: str | Protocol = "paper",
        anatomy: str = "abdomen",
        input_range: str = "model",
        norm_range: Sequence[float] = HU_RANGE,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.protocol = get_protocol(protocol, anatomy)
        if metric not in self.protocol.metric_names:
            raise InputError(
                f"protocol {self.protocol.name} has no metric {metric!r}: use "
                f"{', '.join(self.protocol.metric_names)}"
            )
        if input_range not in ("model", "hu") or (input_range == "hu" and self.protocol.kind != "ct"):
            raise InputError(f"input_range must be 'model' (or 'hu' for CT), got {input_range!r}")
        self.metric = metric
        self.input_range = input_range
        self.norm_range = tuple(float(v) for v in norm_range)
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise InputError(
                f"prediction and target shapes differ: {tuple(y_pred.shape)} vs {tuple(y.shape)}"
            )
        if isinstance(self.protocol, CTProtocol):
            y_pred, y = (_as_slices(t, self.protocol.dtype) for t in (y_pred, y))
            if self.input_range == "model":
                y_pred, y = model_to_hu(y_pred, self.norm_range), model_to_hu(y, self.norm_range)
        return score(y_pred, y, self.metric, self.protocol)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch tensor")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


class MetricHandler(IgniteMetricHandler):
    """Ignite handler for MONAI workflows: the mean of one metric under one protocol over the evaluated
    slices or images. In a bundle config::

        "val_psnr": {"_target_": "ldct_clip.evaluation.MetricHandler", "metric": "psnr", "protocol": "paper"}

    Args:
        metric: "psnr", "ssim" or (CT) "rmse".
        protocol: protocol name (see :class:`ProtocolMetric`).
        anatomy: window of "ldctbench".
        input_range: "model" (the network's range) or "hu" (CT).
        norm_range: HU interval of the CT model range.
        output_transform: picks (y_pred, y) from ``engine.state.output`` (default: its "pred" and "label").
        save_details: keep the per-item values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        metric: str,
        protocol: str = "paper",
        anatomy: str = "abdomen",
        input_range: str = "model",
        norm_range: Sequence[float] = HU_RANGE,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        metric_fn = ProtocolMetric(metric, protocol, anatomy, input_range, norm_range)
        super().__init__(
            metric_fn=metric_fn,
            output_transform=output_transform or from_engine(["pred", "label"]),
            save_details=save_details,
        )
