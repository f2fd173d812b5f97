"""The RGB evaluation protocol (:func:`ldct_clip.metrics_rgb.rgb_metrics`) as MONAI metrics and ignite
handlers, for the validation and evaluation engines of the sRGB and synthetic-noise bundles.

One value per image (``rgb_metrics`` on each (C, H, W) item of the batch), averaged on aggregate: the mean
over images that the reference test scripts print.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ldct_clip.errors import InputError
from ldct_clip.metrics_rgb import PROTOCOLS, rgb_metrics

__all__ = ["RGBMetric", "RGBPSNR", "RGBSSIM"]

_PRED_LABEL = from_engine(["pred", "label"])


class RGBMetric(CumulativeIterationMetric):
    """PSNR or SSIM of the RGB protocol per image, as a MONAI cumulative metric.

    Args:
        metric: "psnr" or "ssim".
        protocol: "synthetic" (x255, no rounding) or "srgb" (x255, rounded to uint8).
        reduction: MONAI reduction over the per-image values.
    """

    def __init__(
        self,
        metric: str = "psnr",
        protocol: str = "synthetic",
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__()
        if metric not in ("psnr", "ssim"):
            raise InputError(f"unknown RGB metric {metric!r}: use psnr or ssim")
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown RGB metric protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        self.metric = metric
        self.protocol = protocol
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise InputError(
                f"prediction and target shapes differ: {tuple(y_pred.shape)} vs {tuple(y.shape)}"
            )
        if y_pred.dim() == 3:
            y_pred, y = y_pred[None], y[None]
        values = [rgb_metrics(t, p, self.protocol)[self.metric] for p, t in zip(y_pred, y)]
        return torch.tensor(values, dtype=torch.float64)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch tensor")
        value, _ = do_metric_reduction(data, reduction or self.reduction)
        return value


class RGBPSNR(IgniteMetricHandler):
    """Ignite handler for MONAI workflows: mean PSNR (dB, peak 255, all channels) over the images.

    Args:
        protocol: "synthetic" or "srgb".
        output_transform: picks (y_pred, y) from ``engine.state.output``.
        save_details: keep the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        protocol: str = "synthetic",
        output_transform: Callable = _PRED_LABEL,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            RGBMetric("psnr", protocol), output_transform=output_transform, save_details=save_details
        )


class RGBSSIM(IgniteMetricHandler):
    """Ignite handler: mean MATLAB-style SSIM over the images; arguments as :class:`RGBPSNR`."""

    def __init__(
        self,
        protocol: str = "synthetic",
        output_transform: Callable = _PRED_LABEL,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            RGBMetric("ssim", protocol), output_transform=output_transform, save_details=save_details
        )
