"""Tables of scores: per-slice metric rows with patient ids (:class:`MetricTable`), and the CSV and JSON
writers of the reports."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ldct_clip.evaluation.protocols import CT_METRICS

__all__ = ["MetricTable", "write_csv", "write_json"]


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
        metrics: the metric names of each group.
    """

    def __init__(
        self,
        protocol: str,
        groups: Sequence[str] = ("input", "denoised"),
        metrics: Sequence[str] = CT_METRICS,
    ) -> None:
        self.protocol = protocol
        self.groups = tuple(groups)
        self.metrics = tuple(metrics)
        self.rows: list[dict] = []

    def add(self, patient: str, slice_index: int, values: Mapping[str, Mapping[str, float]]) -> None:
        """Add one slice: ``values[group][metric]`` for every group and metric."""
        row: dict = {"patient": patient, "slice": int(slice_index)}
        for group in self.groups:
            for name in self.metrics:
                row[f"{group}_{name}"] = float(values[group][name])
        self.rows.append(row)

    def add_batch(
        self,
        patient: str,
        slice_numbers: Sequence[int],
        values: Mapping[str, Mapping[str, torch.Tensor | Sequence[float]]],
    ) -> None:
        """Add the slices of a batch: ``values[group][metric]`` holds one value per slice (as
        ``compute_ct_metrics`` returns them), ``slice_numbers`` their numbers."""
        for i, number in enumerate(slice_numbers):
            self.add(
                patient, number, {g: {m: float(values[g][m][i]) for m in self.metrics} for g in self.groups}
            )

    def _means(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        return {g: {m: _mean(r[f"{g}_{m}"] for r in rows) for m in self.metrics} for g in self.groups}

    def summary(self) -> dict:
        """``{"protocol", "n_slices", <group>: {"psnr","ssim","rmse"}, ..., "per_patient": {id: {...}}}``."""
        out: dict = {"protocol": self.protocol, "n_slices": len(self.rows)}
        out.update(self._means(self.rows))
        out["per_patient"] = {}
        for p in sorted({r["patient"] for r in self.rows}):
            rows = [r for r in self.rows if r["patient"] == p]
            out["per_patient"][p] = {"n_slices": len(rows), **self._means(rows)}
        return out

    def write_csv(self, path: str | Path) -> None:
        """One row per slice: patient, slice, then ``<group>_<metric>`` columns."""
        columns = ["patient", "slice"] + [f"{g}_{m}" for g in self.groups for m in self.metrics]
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
            f"{g + ' ' + m:>18}" for g in self.groups for m in self.metrics
        )
        lines = [f"protocol: {self.protocol}", head]

        def line(name: str, n: int, means: Mapping) -> str:
            cells = "".join(f"{means[g][m]:>18.4f}" for g in self.groups for m in self.metrics)
            return f"{name:<16}{n:>7}{cells}"

        for p, means in summary["per_patient"].items():
            lines.append(line(p, means["n_slices"], means))
        lines.append(line("all", summary["n_slices"], summary))
        return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Rows of dicts to CSV; the columns are the union of the keys in first-seen order; floats with 6
    significant digits, NaN as an empty cell."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_json(data: object, path: str | Path) -> Path:
    """JSON with NaN/inf written as null (strict JSON readers reject NaN)."""
    path = Path(path)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")
    return path


def _finite(value: object) -> object:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_finite(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
