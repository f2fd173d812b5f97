"""The benchmark: our model and classical baselines on low-/normal-dose pairs, measured alike.

Every method gets the same low-dose slices; the normal-dose slice is used only to score the result (PSNR,
SSIM, RMSE under a ``ldct_clip.metrics`` protocol) and to place the measurement ROIs (the flattest region
for the noise standard deviation and the noise power spectrum, the most detailed one for the figure's
zoom), never by a method. ``run_benchmark`` measures; ``write_benchmark_report`` writes ``report.md``,
``benchmark.csv``, ``summary.json`` and the figures.
"""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldct_clip import __version__
from ldct_clip.baselines import BASELINES, get_baseline
from ldct_clip.errors import InputError
from ldct_clip.metrics import compute_ct_metrics, get_protocol
from ldct_clip.reporting import (
    display_pixel_spacing,
    display_slice,
    find_detail_crop,
    find_flat_roi,
    noise_power_spectrum,
    plot_differences,
    plot_nps,
    plot_slices,
    radial_average,
    roi_size,
    roi_std,
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
    "select_slices",
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
# The display window of the figures when the protocol's own interval is no window (the paper's is the
# whole [-1024, 3072] HU range): the abdomen soft-tissue window of the RED-CNN protocol.
ABDOMEN_WINDOW = (-160.0, 240.0)
WARM_UP_SLICES = 16

#: ``(volume, slices_oriented) -> volume``: denoises a whole HU volume (1, X, Y, Z) and returns it in HU,
#: same shape (the ``clip`` method). ``slices_oriented`` is True when the slices are stored as the network
#: sees them already (Mayo npy pairs), so the denoiser must not reorient them.
VolumeDenoiser = Callable[[torch.Tensor, bool], torch.Tensor]


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
    """Grey-scale window of the figures: the protocol's HU interval where it is a window (redcnn,
    ldctbench with its anatomy), the abdomen window [-160, 240] HU for the paper protocol."""
    proto = get_protocol(protocol, anatomy)
    return ABDOMEN_WINDOW if proto.name == "paper" else (float(proto.trunc[0]), float(proto.trunc[1]))


def select_slices(n_slices: int, max_slices: int | None) -> list[int]:
    """All slice indices, or ``max_slices`` of them evenly spaced over the volume (first and last kept)."""
    if max_slices is None or max_slices >= n_slices:
        return list(range(n_slices))
    if max_slices < 1:
        raise InputError(f"--max-slices must be at least 1, got {max_slices}")
    return sorted({int(round(i)) for i in np.linspace(0, n_slices - 1, max_slices)})


@dataclass
class BenchmarkResult:
    """What ``run_benchmark`` measured; ``write_benchmark_report`` turns it into files.

    Attributes:
        protocol: the metric protocol's name.
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
    window: tuple[float, float] = ABDOMEN_WINDOW
    anatomy: str = "abdomen"
    noise_estimator: str = "flat"

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean over all slices of every measured value, per image kind (low dose, methods, normal dose)."""
        out: dict[str, dict[str, float]] = {}
        for method in (LOW_DOSE, *self.methods, NORMAL_DOSE):
            rows = [r for r in self.rows if r["method"] == method]
            keys = [
                k for k in ("psnr", "ssim", "rmse_hu", "noise_std_hu", "seconds") if rows and k in rows[0]
            ]
            out[method] = {k: _nanmean([r[k] for r in rows]) for k in keys}
            out[method]["n_slices"] = len(rows)
        return out

    def per_patient(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for patient in dict.fromkeys(r["patient"] for r in self.rows):
            out[patient] = {}
            for method in (LOW_DOSE, *self.methods, NORMAL_DOSE):
                rows = [r for r in self.rows if r["patient"] == patient and r["method"] == method]
                keys = ("psnr", "ssim", "rmse_hu", "noise_std_hu", "seconds")
                out[patient][method] = {k: _nanmean([r.get(k, float("nan")) for r in rows]) for k in keys}
        return out


def _nanmean(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _as_volume(volume, name: str) -> torch.Tensor:
    t = torch.as_tensor(volume)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1:
        raise InputError(f"{name}: expected a CT volume shaped (1, X, Y, Z), got {tuple(t.shape)}")
    return t


def _affine(volume) -> np.ndarray | None:
    affine = getattr(volume, "affine", None)
    return None if affine is None else np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)


class _NPSAccumulator:
    """Mean 2-D NPS of (image - normal dose) per method over slices of one pixel spacing and ROI size.

    Spectra of different pixel spacings have different frequency axes and cannot be averaged: the first
    slice fixes the spacing, and slices of other spacings are left out (the report says how many went in).
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.key: tuple | None = None
        self.freqs: tuple[np.ndarray, np.ndarray] | None = None
        self.slices = 0

    def add(self, images: dict[str, np.ndarray], reference: np.ndarray, roi, spacing) -> None:
        key = (tuple(spacing) if spacing else None, roi[0].stop - roi[0].start, roi[1].stop - roi[1].start)
        if self.key is None:
            self.key = key
        if key != self.key:
            return
        for name, image in images.items():
            power, fr, fc = noise_power_spectrum(image[roi] - reference[roi], spacing or (1.0, 1.0))
            self.sums[name] = self.sums.get(name, 0.0) + power
            self.counts[name] = self.counts.get(name, 0) + 1
            self.freqs = (fr, fc)
        self.slices += 1

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.freqs is None:
            return {}
        return {
            name: radial_average(total / self.counts[name], *self.freqs) for name, total in self.sums.items()
        }


def _slice_rows(
    patient: str,
    z: int,
    images: dict[str, np.ndarray],
    reference: np.ndarray,
    flat_roi,
    seconds: dict[str, float],
    parameters: dict[str, dict[str, float]],
    protocol: str,
    anatomy: str,
) -> list[dict]:
    """The CSV rows of one slice: every image scored against normal dose, then normal dose itself."""
    names = list(images)
    metrics = compute_ct_metrics(
        torch.from_numpy(np.stack([images[n] for n in names])),
        torch.from_numpy(np.repeat(reference[None], len(names), axis=0)),
        protocol,
        anatomy,
    )
    rows = []
    for i, name in enumerate(names):
        row = {
            "patient": patient,
            "slice": int(z),
            "method": name,
            "psnr": float(metrics["psnr"][i]),
            "ssim": float(metrics["ssim"][i]),
            "rmse_hu": float(metrics["rmse"][i]),
            "noise_std_hu": roi_std(images[name], flat_roi),
            "seconds": seconds.get(name, float("nan")),
        }
        rows.append({**row, **parameters.get(name, {})})
    rows.append(
        {
            "patient": patient,
            "slice": int(z),
            "method": NORMAL_DOSE,
            "noise_std_hu": roi_std(reference, flat_roi),
        }
    )
    return rows


def run_benchmark(
    pairs: Iterable[tuple],
    methods: Sequence[str],
    protocol: str = "paper",
    denoiser: VolumeDenoiser | None = None,
    max_slices: int | None = None,
    progress: bool = True,
    n_patients: int | None = None,
    noise_estimator: str = "flat",
    anatomy: str = "abdomen",
) -> BenchmarkResult:
    """Run every method on every selected low-dose slice and measure it against normal dose.

    Args:
        pairs: ``(patient, low_dose, normal_dose)`` or ``(patient, low_dose, normal_dose, slices_oriented)``:
            HU volumes shaped (1, X, Y, Z). A MetaTensor's affine orients the figures and gives the pixel
            spacing of the NPS; ``slices_oriented`` (default False) says that ``volume[0, ..., z]`` is
            already a slice in display orientation (rows anterior to posterior, as ``find_pairs`` reports
            for Mayo npy slices), which then has no affine to go by.
        methods: names from ``parse_methods``: ``"clip"`` and/or baselines.
        protocol: metric protocol of ``ldct_clip.metrics``: "paper", "redcnn" or "ldctbench".
        denoiser: ``(volume, slices_oriented) -> volume`` in HU, required when ``"clip"`` is among the
            methods; timed per volume of selected slices (after an untimed warm-up on up to 16 of them),
            the time divided by the slices.
        max_slices: at most this many slices per patient, evenly spaced; None for all.
        progress: show a progress bar over slices x methods.
        n_patients: number of pairs, for the progress bar's total when ``pairs`` is a generator.
        noise_estimator: how the baselines estimate the noise of each low-dose slice, ``"flat"`` or
            ``"wavelet"`` (``ldct_clip.baselines.estimate_noise_sigma``).
        anatomy: window of the ``"ldctbench"`` protocol: "chest", "abdomen" or "head".
    """
    methods = parse_methods(methods)
    if "clip" in methods and denoiser is None:
        raise InputError("method 'clip' needs the model: pass --weights FILE (a ldct-clip checkpoint)")
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
            "our CLIP-feature denoiser (the checkpoint given by --weights), slice by slice"
        )

    nps = _NPSAccumulator()
    patients: list[dict] = []
    warmed_up = False
    with tqdm(total=None, desc="benchmark", unit="slice-method", disable=not progress) as bar:
        for pair in pairs:
            patient, low_volume, full_volume = pair[:3]
            oriented = bool(pair[3]) if len(pair) > 3 else False
            low = _as_volume(low_volume, f"{patient} low dose")
            full = _as_volume(full_volume, f"{patient} normal dose")
            if low.shape != full.shape:
                raise InputError(
                    f"patient {patient}: low dose {tuple(low.shape)} and normal dose {tuple(full.shape)} differ "
                    "in shape; give registered pairs of the same geometry"
                )
            affine = None if oriented else _affine(full_volume)
            spacing = display_pixel_spacing(affine)

            def show(slice_2d: np.ndarray, affine=affine, oriented=oriented) -> np.ndarray:
                return (slice_2d if oriented else display_slice(slice_2d, affine)).astype(np.float64)

            indices = select_slices(int(low.shape[-1]), max_slices)
            if bar.total is None and n_patients:
                bar.total = len(indices) * len(methods) * n_patients
                bar.refresh()
            denoised = None
            clip_seconds = float("nan")
            if "clip" in methods:
                sub = low[..., indices]
                if not warmed_up:
                    # Untimed: first calls pay for kernel selection and memory pools, per batch shape, and
                    # a batch holds up to 16 slices (the GPU default).
                    denoiser(low[..., indices[:WARM_UP_SLICES]], oriented)
                    warmed_up = True
                start = time.perf_counter()
                denoised = _as_volume(denoiser(sub, oriented), f"{patient} denoised")
                clip_seconds = (time.perf_counter() - start) / len(indices)
                if denoised.shape != sub.shape:
                    raise InputError(
                        f"the model returned shape {tuple(denoised.shape)} for {tuple(sub.shape)}"
                    )
                denoised = denoised[0].detach().cpu().numpy()
                bar.update(len(indices))
            patients.append(
                {
                    "patient": patient,
                    "shape": [int(s) for s in low.shape[1:]],
                    "slices": indices,
                    "pixel_spacing_mm": list(spacing) if spacing else None,
                }
            )
            for position, z in enumerate(indices):
                reference = show(full[0, ..., z].cpu().numpy())
                images = {LOW_DOSE: show(low[0, ..., z].cpu().numpy())}
                seconds: dict[str, float] = {}
                parameters: dict[str, dict[str, float]] = {}
                for method in methods:
                    if method == "clip":
                        images[method] = show(denoised[..., position])
                        seconds[method] = clip_seconds
                        continue
                    start = time.perf_counter()
                    images[method] = baselines[method](images[LOW_DOSE]).astype(np.float64)
                    seconds[method] = time.perf_counter() - start
                    parameters[method] = dict(baselines[method].last_parameters)
                    bar.update(1)

                # The ROIs are placed on normal dose, once per slice, and shared by every image.
                flat_roi = find_flat_roi(reference, roi_size(reference.shape, 1 / 8, 8, 32))
                nps_side = roi_size(reference.shape, 1 / 4, 8, 128)
                nps.add(images, reference, find_flat_roi(reference, nps_side), spacing)
                result.rows += _slice_rows(
                    patient, z, images, reference, flat_roi, seconds, parameters, protocol, anatomy
                )
                if not result.figure and position == len(indices) // 2:
                    result.figure = {
                        "patient": patient,
                        "slice": int(z),
                        "images": {**images, NORMAL_DOSE: reference},
                        "flat_roi": flat_roi,
                        "crop": find_detail_crop(reference, roi_size(reference.shape, 1 / 4, 16, 160)),
                    }
    if not result.rows:
        raise InputError("no low-/normal-dose pair found to benchmark")
    result.nps = nps.curves()
    result.data = {
        "patients": patients,
        "n_patients": len(patients),
        "n_slices": sum(len(p["slices"]) for p in patients),
        "nps_roi_px": nps.key[1] if nps.key else None,
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
    paths["slices"] = plot_slices(
        labels, result.window, out / "slices.png", crop=fig["crop"], flat_roi=fig["flat_roi"], title=where
    )
    reference = fig["images"][NORMAL_DOSE]
    diffs = {_label(n): image for n, image in fig["images"].items() if n != NORMAL_DOSE}
    paths["differences"] = plot_differences(diffs, reference, out / "differences.png", title=where)
    if result.nps:
        paths["nps"] = plot_nps(
            {_label(n): c for n, c in result.nps.items()},
            out / "nps.png",
            spacing_known=bool(result.data.get("pixel_spacing_known")),
        )

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
        f"- Metrics: `{result.protocol}` (`ldct_clip.metrics`, `{proto.name}`): HU truncated to [{proto.trunc[0]:g}, "
        f"{proto.trunc[1]:g}]{', scaled to [0, 1]' if proto.windowed else ''}, data range {proto.data_range:g}, "
        f"SSIM window {proto.ssim_window}, RMSE on HU clipped to [{proto.rmse_clip[0]:g}, {proto.rmse_clip[1]:g}]. "
        "Per slice, then averaged.",
        "- Noise std: sample standard deviation inside the k x k window (k = 1/8 of the image side, 8 to 32 px) "
        "where the normal-dose slice is flattest inside the body (HU > -500); the window is chosen once per "
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
