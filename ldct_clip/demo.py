"""The built-in demo: a sample low-dose series, denoised with the bundled weights, with figure and metrics.

:func:`run_demo` needs no data: it makes a normal-dose series from the synthetic phantom
(``ldct_clip.data.phantom``), simulates a quarter-dose scan of it (``ldct_clip.simulation``, projection-
domain noise), denoises the low-dose series with the weights shipped in the ``lowdose_ct_denoising``
bundle (or a ``weights`` file) and writes, under one output folder:

- ``normal_dose_dicom/``, ``low_dose_dicom/``, ``denoised_dicom/``: CT DICOM series (the two derived ones
  share the study and frame of reference of the normal-dose series), and the same three volumes as
  ``normal_dose.nii.gz``, ``low_dose.nii.gz``, ``denoised.nii.gz``;
- ``comparison.png``: one slice of normal dose / low dose / denoised in the abdomen window, a zoomed
  crop, and the difference maps to normal dose;
- ``metrics.json``: PSNR / SSIM / RMSE of low dose and denoised against normal dose under the ``redcnn``
  protocol (HU truncated to [-160, 240], where soft-tissue noise matters), the ``paper`` protocol's numbers
  in a sub-dict, noise standard deviation in a flat region, the weights' sha256 and the seconds taken.

The folder is written atomically: an interrupted demo leaves no half output.

Why the phantom and not real slices from a registry package: the CT images of ``pydicom`` /
``pydicom-data`` are single slices of unrelated scans (``CT_small.dcm`` 128 x 128; ``693_*.dcm`` one
512 x 512 slice at 0.48 mm, 5 mm thick; a two-frame enhanced CT; decoder test files), not a series; the
phantom gives an abdomen-like series (body wall, liver with low-contrast lesions, spleen, vessels, spine,
ribs, lung bases) at any size, with an exact normal-dose reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ldct_clip
from ldct_clip.bundles import DEFAULT_CT_BUNDLE, bundle_network_def, bundle_weights
from ldct_clip.errors import WeightsError
from ldct_clip.networks.clip_weights import sha256_of

__all__ = [
    "DEMO_DOSE",
    "DEMO_PHANTOM_SEED",
    "DEMO_PROTOCOL",
    "DEMO_SIMULATION_SEED",
    "DEMO_SIZE",
    "DEMO_SLICES",
    "DEMO_SPACING",
    "DEMO_WINDOW",
    "DEFAULT_DEMO_OUTPUT",
    "DemoResult",
    "run_demo",
]

#: Where ``ldct-clip demo`` writes when no ``--output`` is given (relative to the working directory).
DEFAULT_DEMO_OUTPUT = Path("ldct-clip-demo")
#: In-plane matrix of the demo series: 512 x 512 pixels of 0.8 mm (410 mm field of view; the phantom's body,
#: which scales with the matrix, is then 350 x 250 mm, an adult abdomen). The simulated noise depends on the
#: body's size in mm: quarter dose adds ~13 HU here (~20 HU on the real 512 x 512 series in ../shared/data),
#: but only ~3 HU to a 256 x 256 phantom at 0.8 mm (a 176 mm child-sized body), which leaves nothing to show.
DEMO_SIZE = 512
DEMO_SLICES = 6
DEMO_SPACING = (0.8, 0.8, 3.0)
#: Anatomy of the demo phantom; the demo weights' training phantoms use seeds 1-4 and the held-out one 99
#: (``ldct_clip.data.demo_data``), so the demo shows a phantom the weights have never seen.
DEMO_PHANTOM_SEED = 0
DEMO_SIMULATION_SEED = 0
DEMO_DOSE = 0.25
#: Protocol of the headline numbers: HU truncated to the abdomen window [-160, 240], where the noise shows.
DEMO_PROTOCOL = "redcnn"
DEMO_WINDOW = (-160.0, 240.0)


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
        """Two lines for the terminal: where the outputs are, and what denoising gained."""
        m = self.metrics
        gain = self.psnr_gain
        verdict = "gain" if gain > 0 else "LOSS (these weights make the low-dose input worse)"
        return (
            f"demo written to {self.output_dir}/: DICOM series normal_dose_dicom/ low_dose_dicom/ denoised_dicom/, "
            f"NIfTI *.nii.gz, comparison.png, metrics.json ({m['seconds']['total']:.0f} s)\n"
            f"PSNR ({m['protocol']}, HU in [{DEMO_WINDOW[0]:g}, {DEMO_WINDOW[1]:g}]): low dose "
            f"{m['psnr_low_dose']:.2f} dB -> denoised {m['psnr_denoised']:.2f} dB, {verdict} {gain:+.2f} dB; "
            f"noise std in a flat region {m['noise_std_low_dose']:.1f} -> {m['noise_std_denoised']:.1f} HU "
            f"(normal dose {m['noise_std_normal_dose']:.1f} HU)"
        )


def _slices(volume: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z)`` -> ``(Z, 1, X, Y)``: the axial slices as the metrics take them."""
    data = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    return data[0].permute(2, 0, 1)[:, None].float()


def _scores(volume: torch.Tensor, reference: torch.Tensor, protocol: str) -> dict[str, float]:
    """Mean over slices of PSNR, SSIM and RMSE of ``volume`` against ``reference`` under ``protocol``."""
    from ldct_clip.metrics import compute_ct_metrics

    values = compute_ct_metrics(_slices(volume), _slices(reference), protocol)
    return {name: float(v.mean()) for name, v in values.items()}


def _flat_roi_noise(volumes: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """Noise std (HU) in the flattest window of each normal-dose slice, the same pixels for every volume,
    averaged over slices (the benchmark's measurement, ``ldct_clip.reporting``)."""
    from ldct_clip.reporting import find_flat_roi, roi_size, roi_std

    stds: dict[str, list[float]] = {name: [] for name in volumes}
    for z in range(reference.shape[-1]):
        ref = reference[..., z]
        roi = find_flat_roi(ref, roi_size(ref.shape, 1 / 8, 8, 32))
        for name, volume in volumes.items():
            stds[name].append(roi_std(volume[..., z], roi))
    return {name: float(np.mean(v)) for name, v in stds.items()}


def _stack_vertically(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Two RGB(A) images one above the other, the narrower centred on white."""
    width = max(top.shape[1], bottom.shape[1])

    def pad(image: np.ndarray) -> np.ndarray:
        left = (width - image.shape[1]) // 2
        out = np.ones((image.shape[0], width, image.shape[2]), dtype=image.dtype)
        out[:, left : left + image.shape[1]] = image
        return out

    return np.concatenate([pad(top), pad(bottom)], axis=0)


def _comparison_figure(
    normal: np.ndarray, low: np.ndarray, denoised: np.ndarray, affine: np.ndarray, path: Path, title: str
) -> Path:
    """``comparison.png``: the middle slice in one window with a zoomed crop (``plot_slices``) above the
    difference maps to normal dose (``plot_differences``), both from ``ldct_clip.reporting``."""
    import matplotlib.image

    from ldct_clip.reporting import (
        display_slice,
        find_detail_crop,
        find_flat_roi,
        plot_differences,
        plot_slices,
        roi_size,
    )

    z = normal.shape[-1] // 2
    shown = {
        "normal dose": display_slice(normal[..., z], affine),
        "low dose": display_slice(low[..., z], affine),
        "denoised": display_slice(denoised[..., z], affine),
    }
    reference = shown["normal dose"]
    crop = find_detail_crop(reference, roi_size(reference.shape, 1 / 4, 16, 160))
    flat = find_flat_roi(reference, roi_size(reference.shape, 1 / 8, 8, 32))
    # The two helpers write one figure each; they are rendered to a scratch folder and stacked into one PNG
    # so that the demo has a single picture to look at.
    with tempfile.TemporaryDirectory() as scratch:
        slices_png = plot_slices(
            shown, DEMO_WINDOW, Path(scratch) / "slices.png", crop=crop, flat_roi=flat, title=title
        )
        diffs_png = plot_differences(
            {"low dose": shown["low dose"], "denoised": shown["denoised"]},
            reference,
            Path(scratch) / "differences.png",
            title=f"slice {z + 1}: differences to normal dose",
        )
        image = _stack_vertically(matplotlib.image.imread(slices_png), matplotlib.image.imread(diffs_png))
    matplotlib.image.imsave(path, image)
    return path


def run_demo(
    output_dir: str | os.PathLike = DEFAULT_DEMO_OUTPUT,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    progress: bool = True,
    *,
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
        weights: model weights (an ldct-clip checkpoint); default the bundled demo weights
            (``models/model.pt`` of the low-dose CT bundle, sha256-checked by
            :func:`ldct_clip.bundles.bundle_weights`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... where the network runs.
        overwrite: replace an existing ``output_dir``.
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
    from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
    from ldct_clip.inference import denoise_volume, load_denoiser, resolve_device
    from ldct_clip.io import atomic_output, check_output_path, load_ct, save_dicom_series, save_nifti
    from ldct_clip.reporting import write_json
    from ldct_clip.simulation import DEFAULT_PHOTONS, simulate_low_dose

    start = time.perf_counter()
    final = check_output_path(None, output_dir, overwrite)
    if weights is None:
        weights = bundle_weights(
            DEFAULT_CT_BUNDLE,
            hint="pass --weights FILE, e.g. a checkpoint from `ldct-clip train` or `ldct-clip import-reference`",
        )
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise WeightsError(f"weights file {weights} does not exist; give an ldct-clip checkpoint (.pt)")
    compute_device = resolve_device(device)
    model = load_denoiser(weights, network_def=bundle_network_def, device=compute_device)
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        seconds[stage] = now - since
        return now

    result = DemoResult(output_dir=final)
    names = {
        "normal_dose_dicom": "normal_dose_dicom",
        "low_dose_dicom": "low_dose_dicom",
        "denoised_dicom": "denoised_dicom",
        "normal_dose_nifti": "normal_dose.nii.gz",
        "low_dose_nifti": "low_dose.nii.gz",
        "denoised_nifti": "denoised.nii.gz",
        "comparison": "comparison.png",
        "metrics": "metrics.json",
    }
    tic = lap("load_weights", start)
    with atomic_output(final, overwrite=overwrite, is_dir=True) as tmp:
        out = {key: tmp / name for key, name in names.items()}
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
        tic = lap("phantom", tic)

        low = simulate_low_dose(normal, dose=dose, seed=simulation_seed, workers=workers, progress=progress)
        low = low.round()
        tic = lap("simulation", tic)
        save_dicom_series(
            low,
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
        tic = lap("write_low_dose", tic)

        denoised = denoise_volume(low, model, device=compute_device, progress=progress)
        tic = lap("denoise", tic)
        save_dicom_series(
            denoised,
            out["low_dose_dicom"],
            out["denoised_dicom"],
            description=f"ldct-clip demo phantom, simulated dose {dose:g} [denoised]",
            series_number=3,
        )
        denoised = load_ct(out["denoised_dicom"])
        for key, volume in (("normal_dose", normal), ("low_dose", low), ("denoised", denoised)):
            save_nifti(volume, out[f"{key}_nifti"])
        tic = lap("write_denoised", tic)

        normal_np, low_np, denoised_np = (v[0].numpy().astype(np.float64) for v in (normal, low, denoised))
        scores = {
            protocol: {
                "low_dose": _scores(low, normal, protocol),
                "denoised": _scores(denoised, normal, protocol),
            }
            for protocol in (DEMO_PROTOCOL, "paper")
        }
        noise = _flat_roi_noise(
            {"normal_dose": normal_np, "low_dose": low_np, "denoised": denoised_np}, normal_np
        )
        headline = scores[DEMO_PROTOCOL]
        metrics: dict = {"protocol": DEMO_PROTOCOL, "window_hu": list(DEMO_WINDOW)}
        for metric in ("psnr", "ssim", "rmse"):
            for which in ("low_dose", "denoised"):
                metrics[f"{metric}_{which}"] = headline[which][metric]
        metrics["psnr_gain"] = metrics["psnr_denoised"] - metrics["psnr_low_dose"]
        for which, value in noise.items():
            metrics[f"noise_std_{which}"] = value
        metrics["paper"] = {
            f"{metric}_{which}": scores["paper"][which][metric]
            for metric in ("psnr", "ssim", "rmse")
            for which in ("low_dose", "denoised")
        }
        title = (
            f"ldct-clip demo, dose {dose:g}: PSNR ({DEMO_PROTOCOL}) low dose {metrics['psnr_low_dose']:.2f} dB, "
            f"denoised {metrics['psnr_denoised']:.2f} dB"
        )
        _comparison_figure(
            normal_np, low_np, denoised_np, np.asarray(normal.affine), out["comparison"], title
        )
        tic = lap("metrics_figure", tic)
        seconds["total"] = tic - start
        metrics.update(
            {
                "weights": str(weights.resolve()),
                "weights_sha256": sha256_of(weights),
                "device": str(compute_device),
                "phantom": {
                    "size": size,
                    "slices": slices,
                    "spacing_mm": list(spacing),
                    "seed": phantom_seed,
                },
                "simulation": {"dose": dose, "photons": DEFAULT_PHOTONS, "seed": simulation_seed},
                "slices": int(normal.shape[-1]),
                "seconds": seconds,
            }
        )
        metrics["ldct_clip_version"] = ldct_clip.__version__
        write_json(metrics, out["metrics"])
    result.metrics = metrics
    result.paths = {key: final / name for key, name in names.items()}
    return result
