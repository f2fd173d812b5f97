"""The benchmark report: our model and classical baselines on low-/normal-dose pairs, measured alike.

Every method gets the same low-dose slices; the normal-dose slice is used only to score the result (PSNR,
SSIM, RMSE under an ``ldct_clip.evaluation`` protocol) and to place the measurement ROIs (the flattest
region for the noise standard deviation and the noise power spectrum, the most detailed one for the
figure's zoom), never by a method. The model rows come from the evaluation's pairs loop
(:func:`ldct_clip.evaluation.score_pairs`), the baselines are run on each slice here. ``run_benchmark``
measures; ``write_benchmark_report`` writes ``report.md``, ``benchmark.csv``, ``summary.json`` and the
figures.
"""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldct_clip import __version__
from ldct_clip.baselines import BASELINES, get_baseline
from ldct_clip.conventions import BODY_THRESHOLD_HU, window_bounds
from ldct_clip.errors import InputError
from ldct_clip.evaluation import (
    DETAIL_CROP,
    Denoiser,
    NPSAccumulator,
    PairSource,
    compute_ct_metrics,
    find_detail_crop,
    flat_roi_noise,
    get_protocol,
    plot_differences,
    plot_nps,
    plot_slices,
    roi_size,
    save_figure,
    score_pairs,
    write_csv,
    write_json,
)

__all__ = [
    "LOW_DOSE",
    "METHOD_LABELS",
    "NORMAL_DOSE",
    "BenchmarkResult",
    "display_window",
    "parse_methods",
    "run_benchmark",
    "write_benchmark_report",
]

LOW_DOSE = "low_dose"
NORMAL_DOSE = "normal_dose"
METHOD_LABELS = {
    LOW_DOSE: "low dose",
    "clip": "CLIP denoiser",
    "nlm": "NLM",
    "tv": "TV",
    "bm3d": "BM3D",
    NORMAL_DOSE: "normal dose",
}
KNOWN_METHODS = ("clip", *BASELINES)
#: Slices of the untimed first call of the model: a batch holds up to 16 slices (the GPU default).
WARM_UP_SLICES = 16
MEASURES = ("psnr", "ssim", "rmse_hu", "noise_std_hu", "seconds")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"clip,nlm,tv"`` (or a list) to a checked list of method names, order kept, duplicates dropped."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise InputError(f"no method given: use --methods with some of {','.join(KNOWN_METHODS)}")
    unknown = [n for n in names if n not in KNOWN_METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}: choose from {','.join(KNOWN_METHODS)}")
    return names


def display_window(protocol: str, anatomy: str = "abdomen") -> tuple[float, float]:
    """Grey-scale window of the figures: the protocol's display window (its own window where it has one,
    the abdomen window for the paper's whole-range protocol)."""
    return window_bounds(get_protocol(protocol, anatomy).display_window)


@dataclass
class BenchmarkResult:
    """What ``run_benchmark`` measured; ``write_benchmark_report`` turns it into files.

    Attributes:
        protocol: the metric protocol's name as given ("paper", "redcnn", "ldctbench").
        methods: the benchmarked methods (without low and normal dose).
        rows: one dict per slice and image (low dose, each method, normal dose): patient, slice, method,
            psnr, ssim, rmse_hu, noise_std_hu, seconds, and the baselines' estimated parameters.
        descriptions: method -> how it works and how its parameters are set.
        nps: method (and low dose) -> ``(frequency mm^-1, NPS HU^2 mm^2)``, radially averaged.
        figure: images of one slice (display orientation) and its ROIs, for the figures.
        data: what was benchmarked (patients, slices, shapes, pixel spacing).
        window: the figures' display window, HU.
        anatomy: the anatomy of the ``"ldctbench"`` protocol's window.
        noise_estimator: how the baselines estimated each slice's noise.
    """

    protocol: str
    methods: list[str]
    rows: list[dict] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    nps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    figure: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    window: tuple[float, float] = window_bounds("abdomen")
    anatomy: str = "abdomen"
    noise_estimator: str = "flat"

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean over all slices of every measured value, per image kind (low dose, methods, normal dose)."""
        out: dict[str, dict[str, float]] = {}
        for method in (LOW_DOSE, *self.methods, NORMAL_DOSE):
            rows = [r for r in self.rows if r["method"] == method]
            keys = [k for k in MEASURES if rows and k in rows[0]]
            out[method] = {k: _nanmean([r[k] for r in rows]) for k in keys}
            out[method]["n_slices"] = len(rows)
        return out

    def per_patient(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for patient in dict.fromkeys(r["patient"] for r in self.rows):
            out[patient] = {}
            for method in (LOW_DOSE, *self.methods, NORMAL_DOSE):
                rows = [r for r in self.rows if r["patient"] == patient and r["method"] == method]
                out[patient][method] = {k: _nanmean([r.get(k, float("nan")) for r in rows]) for k in MEASURES}
        return out


def _nanmean(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _slice_rows(
    patient: str,
    z: int,
    images: dict[str, np.ndarray],
    reference: np.ndarray,
    scores: dict[str, dict[str, float]],
    seconds: dict[str, float],
    parameters: dict[str, dict[str, float]],
) -> tuple[list[dict], tuple[slice, slice]]:
    """The CSV rows of one slice: every image scored against normal dose, then normal dose itself."""
    flat_roi, noise = flat_roi_noise({**images, NORMAL_DOSE: reference}, reference)
    rows = []
    for name in images:
        row = {
            "patient": patient,
            "slice": int(z),
            "method": name,
            "psnr": scores[name]["psnr"],
            "ssim": scores[name]["ssim"],
            "rmse_hu": scores[name]["rmse"],
            "noise_std_hu": noise[name],
            "seconds": seconds.get(name, float("nan")),
        }
        rows.append({**row, **parameters.get(name, {})})
    rows.append(
        {"patient": patient, "slice": int(z), "method": NORMAL_DOSE, "noise_std_hu": noise[NORMAL_DOSE]}
    )
    return rows, flat_roi


def run_benchmark(
    pairs: Iterable[PairSource],
    methods: Sequence[str],
    protocol: str = "paper",
    denoise: Denoiser | None = None,
    max_slices: int | None = None,
    progress: bool = True,
    n_patients: int | None = None,
    noise_estimator: str = "flat",
    anatomy: str = "abdomen",
) -> BenchmarkResult:
    """Run every method on every selected low-dose slice and measure it against normal dose.

    Args:
        pairs: ``find_pairs`` entries, or ``(patient, low_dose, normal_dose[, slices_oriented])`` HU volumes
            shaped (1, X, Y, Z) (see :func:`ldct_clip.evaluation.score_pairs`). A MetaTensor's affine
            orients the figures and gives the pixel spacing of the NPS.
        methods: names from ``parse_methods``: ``"clip"`` and/or baselines.
        protocol: metric protocol: "paper", "redcnn" or "ldctbench".
        denoise: the model, ``volume -> volume`` in HU (:data:`ldct_clip.evaluation.Denoiser`), required
            when ``"clip"`` is among the methods; timed per volume of selected slices (after an untimed
            warm-up on up to 16 of them), the time divided by the slices.
        max_slices: at most this many slices per patient, evenly spaced; None for all.
        progress: show a progress bar over slices x methods.
        n_patients: number of pairs, for the progress bar's total when ``pairs`` is a generator.
        noise_estimator: how the baselines estimate the noise of each low-dose slice, ``"flat"`` or
            ``"wavelet"`` (``ldct_clip.baselines.estimate_noise_sigma``).
        anatomy: window of the ``"ldctbench"`` protocol: "chest", "abdomen" or "head".
    """
    methods = parse_methods(methods)
    if "clip" in methods and denoise is None:
        raise InputError("method 'clip' needs the model: pass --weights FILE (a ldct-clip checkpoint)")
    proto = get_protocol(protocol, anatomy)
    baselines = {m: get_baseline(m, noise_estimator) for m in methods if m != "clip"}
    result = BenchmarkResult(
        protocol=protocol,
        methods=methods,
        window=display_window(protocol, anatomy),
        anatomy=anatomy,
        noise_estimator=noise_estimator,
    )
    result.descriptions = {m: b.describe() for m, b in baselines.items()}
    if "clip" in methods:
        result.descriptions["clip"] = (
            "our CLIP-feature denoiser (the bundle's weights or those given by --weights), slice by slice"
        )

    nps = NPSAccumulator()
    patients: list[dict] = []
    records = score_pairs(
        pairs,
        denoise if "clip" in methods else None,
        (proto,),
        max_slices=max_slices,
        display=True,
        warm_up=WARM_UP_SLICES,
    )
    with tqdm(total=None, desc="benchmark", unit="slice-method", disable=not progress) as bar:
        for record in records:
            indices, spacing = record.indices, record.pixel_spacing
            if bar.total is None and n_patients:
                bar.total = len(indices) * len(methods) * n_patients
                bar.refresh()
            if record.denoised is not None:
                bar.update(len(indices))
            patients.append(
                {
                    "patient": record.patient,
                    "shape": list(record.shape),
                    "slices": indices,
                    "pixel_spacing_mm": list(spacing) if spacing else None,
                }
            )
            model_scores = record.scores[proto.name]
            for position, z in enumerate(indices):
                reference = record.display("full", position)
                images = {LOW_DOSE: record.display("low", position)}
                scores = {LOW_DOSE: {m: float(v[position]) for m, v in model_scores["input"].items()}}
                seconds: dict[str, float] = {}
                parameters: dict[str, dict[str, float]] = {}
                for method in methods:
                    if method == "clip":
                        images[method] = record.display("denoised", position)
                        scores[method] = {m: float(v[position]) for m, v in model_scores["denoised"].items()}
                        seconds[method] = record.seconds_per_slice
                        continue
                    start = time.perf_counter()
                    images[method] = baselines[method](images[LOW_DOSE]).astype(np.float64)
                    seconds[method] = time.perf_counter() - start
                    parameters[method] = dict(baselines[method].last_parameters)
                    values = compute_ct_metrics(images[method], reference, proto)
                    scores[method] = {m: float(v[0]) for m, v in values.items()}
                    bar.update(1)

                # The ROIs are placed on normal dose, once per slice, and shared by every image.
                rows, flat_roi = _slice_rows(
                    record.patient, z, images, reference, scores, seconds, parameters
                )
                result.rows += rows
                nps.add(images, reference, spacing)
                if not result.figure and position == len(indices) // 2:
                    result.figure = {
                        "patient": record.patient,
                        "slice": int(z),
                        "images": {**images, NORMAL_DOSE: reference},
                        "flat_roi": flat_roi,
                        "crop": find_detail_crop(reference, roi_size(reference.shape, *DETAIL_CROP)),
                    }
    if not result.rows:
        raise InputError("no low-/normal-dose pair found to benchmark")
    result.nps = nps.curves()
    result.data = {
        "patients": patients,
        "n_patients": len(patients),
        "n_slices": sum(len(p["slices"]) for p in patients),
        "nps_roi_px": nps.roi_px,
        "nps_slices": nps.slices,
        "pixel_spacing_known": all(p["pixel_spacing_mm"] for p in patients),
    }
    return result


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def write_benchmark_report(
    result: BenchmarkResult, output_dir: str | Path, source: str = "", command: str = ""
) -> dict[str, Path]:
    """Write ``report.md``, ``benchmark.csv``, ``summary.json`` and the PNG figures into ``output_dir``
    (which must exist; the CLI makes it atomically). Returns the written paths by name."""
    out = Path(output_dir)
    paths: dict[str, Path] = {}
    proto = get_protocol(result.protocol, result.anatomy)
    fig = result.figure
    labels = {_label(n): image for n, image in fig["images"].items()}
    where = f"{fig['patient']}, slice {fig['slice']}"
    paths["slices"] = save_figure(
        plot_slices(labels, result.window, crop=fig["crop"], flat_roi=fig["flat_roi"], title=where),
        out / "slices.png",
    )
    reference = fig["images"][NORMAL_DOSE]
    diffs = {_label(n): image for n, image in fig["images"].items() if n != NORMAL_DOSE}
    paths["differences"] = save_figure(
        plot_differences(diffs, reference, title=where), out / "differences.png"
    )
    if result.nps:
        curves = {_label(n): c for n, c in result.nps.items()}
        spacing_known = bool(result.data.get("pixel_spacing_known"))
        paths["nps"] = save_figure(plot_nps(curves, spacing_known=spacing_known), out / "nps.png")

    summary = result.summary()
    paths["csv"] = write_csv(result.rows, out / "benchmark.csv")
    paths["summary"] = write_json(
        {
            "protocol": result.protocol,
            "anatomy": result.anatomy,
            "noise_estimator": result.noise_estimator,
            "protocol_details": {
                "name": proto.name,
                "truncation_hu": list(proto.trunc),
                "data_range": proto.data_range,
                "ssim_window": proto.ssim_window,
                "rmse_clip_hu": list(proto.rmse_clip),
            },
            "methods": {
                m: {"label": _label(m), "description": result.descriptions.get(m, "")} for m in result.methods
            },
            "summary": summary,
            "per_patient": result.per_patient(),
            "nps": {n: {"frequency_per_mm": f, "nps_hu2_mm2": v} for n, (f, v) in result.nps.items()},
            "data": {**result.data, "source": source},
            "figure": {"patient": fig["patient"], "slice": fig["slice"], "window_hu": list(result.window)},
            "ldct_clip_version": __version__,
        },
        out / "summary.json",
    )
    paths["report"] = out / "report.md"
    paths["report"].write_text(_report_markdown(result, summary, paths, source, command))
    return paths


def _report_markdown(
    result: BenchmarkResult, summary: dict, paths: dict[str, Path], source: str, command: str
) -> str:
    proto = get_protocol(result.protocol, result.anatomy)
    data = result.data
    lines = [
        "# ldct-clip benchmark",
        "",
        f"ldct-clip {__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += [
        "",
        "## Results",
        "",
        f"Means over {data['n_slices']} slices of {data['n_patients']} patient(s). PSNR, SSIM and RMSE against "
        f"normal dose under the `{result.protocol}` protocol; noise std in a flat ROI of each slice; seconds "
        "per slice of the method alone (loading and scoring excluded).",
        "",
        "| method | PSNR (dB) | SSIM | RMSE (HU) | noise std (HU) | seconds/slice |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in (LOW_DOSE, *result.methods, NORMAL_DOSE):
        s = summary[method]
        lines.append(
            f"| {_label(method)} | {_fmt(s.get('psnr'), 2)} | {_fmt(s.get('ssim'), 4)} | {_fmt(s.get('rmse_hu'), 1)} "
            f"| {_fmt(s.get('noise_std_hu'), 1)} | {_fmt(s.get('seconds'), 3)} |"
        )
    spacing_note = (
        "from the volumes' affine"
        if data.get("pixel_spacing_known")
        else "unknown for some inputs (no affine): 1 mm assumed, so the NPS axes are per pixel"
    )
    lines += [
        "",
        "## Protocol",
        "",
        f"- Metrics: `{result.protocol}` (`ldct_clip.evaluation`, `{proto.name}`): HU truncated to [{proto.trunc[0]:g}, "
        f"{proto.trunc[1]:g}]{', scaled to [0, 1]' if proto.windowed else ''}, data range {proto.data_range:g}, "
        f"SSIM window {proto.ssim_window}, RMSE on HU clipped to [{proto.rmse_clip[0]:g}, {proto.rmse_clip[1]:g}]. "
        "Per slice, then averaged.",
        "- Noise std: sample standard deviation inside the k x k window (k = 1/8 of the image side, 8 to 32 px) "
        f"where the normal-dose slice is flattest inside the body (HU > {BODY_THRESHOLD_HU:g}); the window is chosen once per "
        "slice on normal dose and reused for every image, so all are measured on the same pixels. The "
        "normal-dose value is biased low by that choice.",
        f"- Noise power spectrum: 2-D NPS of (image - normal dose) in the flattest {data.get('nps_roi_px')} x "
        f"{data.get('nps_roi_px')} px window of each slice, mean removed, averaged over {data.get('nps_slices')} "
        "slices (those of the first slice's pixel spacing) and radially "
        f"averaged; HU^2 mm^2 against mm^-1, pixel spacing {spacing_note}. The normal dose's own noise is "
        "part of every difference.",
        "- The methods never see the normal-dose image. Baselines estimate their noise level from each "
        "low-dose slice; their parameters follow from it by rules fixed in `ldct_clip.baselines`, not tuned "
        "on these pairs.",
        "",
        "## Methods",
        "",
    ]
    for method in result.methods:
        lines.append(f"- **{_label(method)}** (`{method}`): {result.descriptions.get(method, '')}")
    lines += [
        "",
        "## Data",
        "",
        f"Pairs: `{source}`" if source else "Pairs: given in memory",
        "",
        "| patient | shape (X, Y, Z) | slices benchmarked | pixel spacing (mm) |",
        "|---|---|---:|---|",
    ]
    for p in data["patients"]:
        spacing = (
            " x ".join(f"{s:.3g}" for s in p["pixel_spacing_mm"]) if p["pixel_spacing_mm"] else "unknown"
        )
        lines.append(
            f"| {p['patient']} | {' x '.join(map(str, p['shape']))} | {len(p['slices'])} | {spacing} |"
        )
    fig = result.figure
    lines += [
        "",
        "## Figures",
        "",
        f"Patient {fig['patient']}, slice {fig['slice']}, window [{result.window[0]:g}, {result.window[1]:g}] HU. "
        "Yellow: the zoomed crop (the most detailed region); cyan: the noise ROI.",
        "",
        f"![slices]({paths['slices'].name})",
        "",
        "Differences to normal dose, one symmetric colour scale for all panels:",
        "",
        f"![differences]({paths['differences'].name})",
        "",
    ]
    if "nps" in paths:
        lines += ["Noise power spectrum:", "", f"![nps]({paths['nps'].name})", ""]
    lines += [
        "Per-slice values: `benchmark.csv`; means, per-patient means and the NPS curves: `summary.json`.",
        "",
    ]
    return "\n".join(lines)
