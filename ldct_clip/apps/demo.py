"""The built-in demo: a sample low-dose series, denoised with the bundled weights, with figure and metrics.

:func:`run_demo` needs no data: it makes a normal-dose series from the synthetic phantom
(``ldct_clip.data.phantom``), simulates a quarter-dose scan of it (``ldct_clip.simulation``, projection-
domain noise), denoises the low-dose series with the weights shipped in the ``lowdose_ct_denoising``
bundle (or a ``weights`` file) and writes, under one output folder:

- ``normal_dose_dicom/``, ``low_dose_dicom/``, ``denoised_dicom/``: CT DICOM series (the two derived ones
  share the study and frame of reference of the normal-dose series), and the same three volumes as
  ``normal_dose.nii.gz``, ``low_dose.nii.gz``, ``denoised.nii.gz``;
- ``comparison.png``: one figure: a slice of normal dose / low dose / denoised in the abdomen window, a
  zoomed crop, and the difference maps to normal dose;
- ``metrics.json``: PSNR / SSIM / RMSE of low dose and denoised against normal dose under the ``redcnn``
  protocol (HU truncated to the abdomen window, where soft-tissue noise matters), the ``paper`` protocol's
  numbers in a sub-dict, noise standard deviation in a flat region, the weights' sha256 and the seconds.

The scores come from the evaluation's pairs loop (:func:`ldct_clip.evaluation.score_pairs`), on the
volumes as read back from the written DICOM series. The terminal summary gives both protocols and says
plainly which number got worse. The folder is written staged: an interrupted demo leaves no half output.

Why the phantom and not real slices from a registry package: the CT images of ``pydicom`` /
``pydicom-data`` are single slices of unrelated scans, not a series; the phantom gives an abdomen-like
series (body wall, liver with low-contrast lesions, spleen, vessels, spine, ribs, lung bases) at any size,
with an exact normal-dose reference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ldct_clip
from ldct_clip.bundles import DEFAULT_CT_BUNDLE, BundlePipeline
from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.evaluation import (
    DETAIL_CROP,
    NOISE_ROI,
    display_slice,
    find_detail_crop,
    find_flat_roi,
    flat_roi_noise,
    get_protocol,
    plot_comparison,
    roi_size,
    save_figure,
    score_pairs,
    volume_affine,
    write_json,
)
from ldct_clip.io import load_ct, save_dicom_series, save_nifti
from ldct_clip.io.staging import check_output_path, staged_output
from ldct_clip.simulation import DEFAULT_PHOTONS, simulate_low_dose

__all__ = [
    "DEFAULT_DEMO_OUTPUT",
    "DEMO_DOSE",
    "DEMO_PHANTOM_SEED",
    "DEMO_PROTOCOL",
    "DEMO_SIMULATION_SEED",
    "DEMO_SIZE",
    "DEMO_SLICES",
    "DEMO_SPACING",
    "DemoResult",
    "run_demo",
]

#: Where ``ldct-clip demo`` writes when no ``--output`` is given (relative to the working directory).
DEFAULT_DEMO_OUTPUT = Path("ldct-clip-demo")
#: In-plane matrix of the demo series: 512 x 512 pixels of 0.8 mm (410 mm field of view; the phantom's body,
#: which scales with the matrix, is then 350 x 250 mm, an adult abdomen). The simulated noise depends on the
#: body's size in mm: a 256 x 256 phantom at 0.8 mm is child-sized and gets too little noise to show.
DEMO_SIZE = 512
DEMO_SLICES = 6
DEMO_SPACING = (0.8, 0.8, 3.0)
#: Anatomy of the demo phantom; the demo weights' training phantoms use seeds 1-4 and the held-out one 99,
#: so the demo shows a phantom the weights have never seen.
DEMO_PHANTOM_SEED = 0
DEMO_SIMULATION_SEED = 0
DEMO_DOSE = 0.25
#: Protocol of the headline numbers: HU truncated to the abdomen window, where the noise shows; the
#: full-range "paper" protocol is reported beside it.
DEMO_PROTOCOL = "redcnn"
PROTOCOLS = (DEMO_PROTOCOL, "paper")
#: (metric, label, unit, digits, higher is better) of the terminal summary.
_REPORTED = (
    ("psnr", "PSNR", " dB", 2, True),
    ("ssim", "SSIM", "", 4, True),
    ("rmse", "RMSE", " HU", 1, False),
)
_OUTPUTS = {
    "normal_dose_dicom": "normal_dose_dicom",
    "low_dose_dicom": "low_dose_dicom",
    "denoised_dicom": "denoised_dicom",
    "normal_dose_nifti": "normal_dose.nii.gz",
    "low_dose_nifti": "low_dose.nii.gz",
    "denoised_nifti": "denoised.nii.gz",
    "comparison": "comparison.png",
    "metrics": "metrics.json",
}


def _change(label: str, before: float, after: float, unit: str, digits: int, higher_is_better: bool) -> str:
    """``"PSNR 52.50 -> 51.46 dB: WORSE by 1.04 dB"``: the change said in words, at the printed precision."""
    delta = round(round(after, digits) - round(before, digits), digits)
    better = delta > 0 if higher_is_better else delta < 0
    verdict = (
        "unchanged" if delta == 0 else f"{'better' if better else 'WORSE'} by {abs(delta):.{digits}f}{unit}"
    )
    return f"{label} {before:.{digits}f} -> {after:.{digits}f}{unit}: {verdict}"


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and measured.

    Attributes:
        output_dir: the demo folder.
        paths: output name (``normal_dose_dicom``, ``low_dose_nifti``, ``comparison``, ``metrics``...) to path.
        metrics: the content of ``metrics.json``.
    """

    output_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def psnr_gain(self) -> float:
        """PSNR of the denoised series minus that of the low-dose series (dB, headline protocol)."""
        return float(self.metrics["psnr_denoised"] - self.metrics["psnr_low_dose"])

    def summary(self) -> str:
        """Lines for the terminal: where the outputs are, then low dose -> denoised under both protocols and
        in a flat region, each change said in words ("WORSE by ..." where a number got worse)."""
        m = self.metrics
        lines = [
            f"demo written to {self.output_dir}/: DICOM series normal_dose_dicom/ low_dose_dicom/ "
            f"denoised_dicom/, NIfTI *.nii.gz, comparison.png, metrics.json ({m['seconds']['total']:.0f} s)"
        ]
        for protocol, values in ((m["protocol"], m), ("paper", m["paper"])):
            low, high = get_protocol(protocol).trunc
            changes = "; ".join(
                _change(label, values[f"{key}_low_dose"], values[f"{key}_denoised"], *rest)
                for key, label, *rest in _REPORTED
            )
            lines.append(f"{protocol} protocol (HU in [{low:g}, {high:g}]): {changes}")
        noise = _change("low dose", m["noise_std_low_dose"], m["noise_std_denoised"], " HU", 1, False)
        lines.append(f"noise std in a flat region: {noise} (normal dose {m['noise_std_normal_dose']:.1f} HU)")
        return "\n".join(lines)


def _flat_region_noise(volumes: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """Noise std (HU) in the flattest window of each normal-dose slice, the same pixels for every volume
    (:func:`ldct_clip.evaluation.flat_roi_noise`), averaged over slices."""
    stds: dict[str, list[float]] = {name: [] for name in volumes}
    for z in range(reference.shape[-1]):
        _, noise = flat_roi_noise({name: v[..., z] for name, v in volumes.items()}, reference[..., z])
        for name, value in noise.items():
            stds[name].append(value)
    return {name: float(np.mean(v)) for name, v in stds.items()}


def _comparison(volumes: dict[str, np.ndarray], affine: np.ndarray | None, title: str):
    """The middle slice of each volume (display orientation) in the abdomen window with a zoomed crop, over
    the difference maps to normal dose: one figure."""
    z = volumes["normal dose"].shape[-1] // 2
    shown = {name: display_slice(volume[..., z], affine) for name, volume in volumes.items()}
    reference = shown["normal dose"]
    return plot_comparison(
        shown,
        "normal dose",
        get_protocol(DEMO_PROTOCOL).display_window,
        crop=find_detail_crop(reference, roi_size(reference.shape, *DETAIL_CROP)),
        flat_roi=find_flat_roi(reference, roi_size(reference.shape, *NOISE_ROI)),
        title=title,
        differences_title=f"slice {z + 1}: differences to normal dose",
    )


def _metrics(scores: dict, noise: dict[str, float]) -> dict:
    """``metrics.json``'s scores: the headline protocol's means at the top level, the paper's in a sub-dict."""
    means = {
        protocol: {group: {m: float(v.mean()) for m, v in values.items()} for group, values in groups.items()}
        for protocol, groups in scores.items()
    }
    groups = {"low_dose": "input", "denoised": "denoised"}
    headline = means[DEMO_PROTOCOL]
    metrics: dict = {
        "protocol": DEMO_PROTOCOL,
        "window_hu": list(get_protocol(DEMO_PROTOCOL).trunc),
    }
    for metric in ("psnr", "ssim", "rmse"):
        for which, group in groups.items():
            metrics[f"{metric}_{which}"] = headline[group][metric]
    metrics["psnr_gain"] = metrics["psnr_denoised"] - metrics["psnr_low_dose"]
    for which, value in noise.items():
        metrics[f"noise_std_{which}"] = value
    metrics["paper"] = {
        f"{metric}_{which}": means["paper"][group][metric]
        for metric in ("psnr", "ssim", "rmse")
        for which, group in groups.items()
    }
    return metrics


def run_demo(
    output_dir: str | os.PathLike = DEFAULT_DEMO_OUTPUT,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    progress: bool = True,
    *,
    bundle: str | os.PathLike = DEFAULT_CT_BUNDLE,
    overrides: dict | None = None,
    command: str = "",
    size: int = DEMO_SIZE,
    slices: int = DEMO_SLICES,
    spacing: Sequence[float] = DEMO_SPACING,
    dose: float = DEMO_DOSE,
    phantom_seed: int = DEMO_PHANTOM_SEED,
    simulation_seed: int = DEMO_SIMULATION_SEED,
    workers: int | None = None,
) -> DemoResult:
    """Run the demo: phantom normal dose -> simulated low dose -> denoised, with DICOM, NIfTI, figure, metrics.

    Args:
        output_dir: folder to create (refused if it exists, unless ``overwrite``).
        weights: model weights; default the bundle's ``models/model.pt`` (the shipped demo weights,
            sha256-checked while they are read).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... where the network runs.
        bundle: the CT bundle whose pipeline denoises (a folder or a shipped bundle's name).
        overrides: more config overrides of the bundle (e.g. a network that fits ``weights``).
        command: the command line, recorded in the outputs' provenance.
        overwrite: replace an existing ``output_dir`` (an earlier demo's, unchanged).
        progress: progress bars for the simulation and the denoising.
        size: in-plane matrix of the phantom (tests use a small one).
        slices: number of axial slices.
        spacing: voxel size (x, y, z) in mm.
        dose: simulated dose fraction.
        phantom_seed: anatomy of the phantom.
        simulation_seed: seed of the simulated noise.
        workers: simulation processes (default one per CPU).

    Returns:
        the :class:`DemoResult` (paths and metrics).

    Raises:
        OutputError: ``output_dir`` exists and ``overwrite`` is False (checked before any work).
        WeightsError: no weights given and none bundled, or a weights file that cannot be loaded.
    """
    start = time.perf_counter()
    final = check_output_path(None, output_dir, overwrite)
    values = {"device": str(device), "progress": progress, "inplace": False, "jobs": [], "command": command}
    if weights is not None:
        values["ckpt_path"] = str(Path(weights).expanduser().resolve())
    pipeline = BundlePipeline(bundle, overrides={**values, **(overrides or {})})
    loader = pipeline.load_weights()  # before any work: missing or damaged weights cost nothing
    seconds: dict[str, float] = {}
    tic = start

    def lap(stage: str) -> None:
        nonlocal tic
        now = time.perf_counter()
        seconds[stage], tic = now - tic, now

    lap("load_weights")
    with staged_output(final, overwrite=overwrite, is_dir=True) as tmp:
        out = {key: tmp / name for key, name in _OUTPUTS.items()}
        phantom = make_phantom(size, slices, spacing, phantom_seed)
        write_phantom_dicom(
            out["normal_dose_dicom"],
            seed=phantom_seed,
            spacing=spacing,
            volume=phantom,
            SeriesDescription="ldct-clip demo phantom, normal dose",
        )
        # Everything downstream reads the series back, as a user's data would be read: what is measured is
        # what the DICOM files hold (integer HU).
        normal = load_ct(out["normal_dose_dicom"])
        lap("phantom")

        low = simulate_low_dose(normal, dose=dose, seed=simulation_seed, workers=workers, progress=progress)
        lap("simulation")
        save_dicom_series(
            low.round(),
            out["normal_dose_dicom"],
            out["low_dose_dicom"],
            description=f"ldct-clip demo phantom, simulated dose {dose:g}",
            derivation=(
                f"Simulated {dose:g} dose (projection-domain noise insertion, {DEFAULT_PHOTONS:.3g} photons, "
                f"seed {simulation_seed}) by the ldct-clip {ldct_clip.__version__} demo"
            ),
            series_number=2,
        )
        low = load_ct(out["low_dose_dicom"])
        lap("write_low_dose")

        def denoise_and_write(volume: torch.Tensor) -> torch.Tensor:
            """Denoise and write the derived series (the bundle's pipeline), write the three NIfTI volumes,
            and give back what was written."""
            pipeline.run([{"image": volume, "output": str(out["denoised_dicom"]), "output_format": "dicom"}])
            lap("denoise")
            denoised = load_ct(out["denoised_dicom"], include_derived=True)
            for key, written in (("normal_dose", normal), ("low_dose", low), ("denoised", denoised)):
                save_nifti(written, out[f"{key}_nifti"])
            lap("write_denoised")
            return denoised

        record = next(score_pairs([("phantom", low, normal)], denoise_and_write, PROTOCOLS))
        volumes = {
            "normal_dose": normal[0].numpy().astype(np.float64),
            "low_dose": low[0].numpy().astype(np.float64),
            "denoised": record.denoised[0].numpy().astype(np.float64),
        }
        metrics = _metrics(record.scores, _flat_region_noise(volumes, volumes["normal_dose"]))
        title = (
            f"ldct-clip demo, dose {dose:g}: PSNR ({DEMO_PROTOCOL}) low dose {metrics['psnr_low_dose']:.2f} dB, "
            f"denoised {metrics['psnr_denoised']:.2f} dB"
        )
        shown = {"normal dose": "normal_dose", "low dose": "low_dose", "denoised": "denoised"}
        figure = _comparison(
            {label: volumes[key] for label, key in shown.items()}, volume_affine(normal), title
        )
        save_figure(figure, out["comparison"])
        lap("metrics_figure")
        seconds["total"] = tic - start
        metrics.update(
            {
                "weights": str(Path(loader.load_path).resolve()),
                "weights_sha256": loader.sha256,
                "device": str(pipeline.get("compute_device")),
                "phantom": {
                    "size": size,
                    "slices": slices,
                    "spacing_mm": list(spacing),
                    "seed": phantom_seed,
                },
                "simulation": {"dose": dose, "photons": DEFAULT_PHOTONS, "seed": simulation_seed},
                "slices": int(normal.shape[-1]),
                "seconds": seconds,
                "ldct_clip_version": ldct_clip.__version__,
            }
        )
        write_json(metrics, out["metrics"])
    return DemoResult(
        output_dir=final, paths={key: final / name for key, name in _OUTPUTS.items()}, metrics=metrics
    )
