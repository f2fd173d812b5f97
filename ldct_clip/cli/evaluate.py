"""``ldct-clip evaluate``: score a trained denoiser on low-/normal-dose pairs under a metric protocol.

For every patient of ``--pairs`` the low-dose volume is denoised slice by slice
(``ldct_clip.inference.denoise_volume``: reflect-padding to a multiple of 32 as the reference evaluation,
float32 unless ``--amp``), then the low-dose input and the denoised output are scored against the
normal-dose volume, slice by slice, under the protocol (``ldct_clip.metrics``). Output folder:
``metrics.csv`` (one row per slice), ``summary.json`` (means over all slices and per patient) and
``example.png`` (one slice: low dose, denoised, normal dose).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldct_clip.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a trained model on low-/normal-dose pairs (PSNR, SSIM, RMSE under a protocol)",
        description=(
            "Denoise the low-dose volumes of a pairs folder and score input and output against normal "
            "dose. Layouts: {patient}/low/ + {patient}/full/ (DICOM series or one NIfTI each), "
            "{patient}_low.nii.gz + {patient}_full.nii.gz, or Mayo {patient}_{slice}_input|target.npy."
        ),
    )
    parser.add_argument("--pairs", required=True, metavar="DIR", help="folder of low-/normal-dose pairs")
    parser.add_argument(
        "--weights", required=True, metavar="FILE", help="trained model (model.pt, best.pt...)"
    )
    parser.add_argument(
        "--protocol",
        choices=["paper", "redcnn", "ldctbench"],
        default="paper",
        help="metric protocol (default: paper, HU [-1024, 3072], range 4096)",
    )
    parser.add_argument(
        "--anatomy",
        choices=["chest", "abdomen", "head"],
        default="abdomen",
        help="display window of the ldctbench protocol (default abdomen)",
    )
    parser.add_argument(
        "--output", default="evaluation", metavar="DIR", help="output folder (default ./evaluation)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="slices per network call")
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision (default float32, as the reference)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _slices(volume: torch.Tensor) -> torch.Tensor:
    """(1, X, Y, Z) -> (Z, 1, X, Y): the axial slices as a batch."""
    t = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    return t[0].permute(2, 0, 1)[:, None].float()


def evaluate_pairs(
    pairs_dir: str | Path,
    model: torch.nn.Module,
    protocol: str = "paper",
    anatomy: str = "abdomen",
    device: str = "auto",
    batch_size: int | None = None,
    amp: bool = False,
    progress: bool = True,
):
    """Denoise and score every pair of ``pairs_dir``.

    Returns:
        ``(table, example)``: a :class:`ldct_clip.metrics.MetricTable` with groups "input" and "denoised",
        and ``(low, denoised, full)`` HU slices of the first patient's middle slice for a figure.
    """
    from tqdm.auto import tqdm

    from ldct_clip.data.datasets import find_pairs, load_pair_volumes
    from ldct_clip.inference import denoise_volume
    from ldct_clip.metrics import MetricTable, compute_ct_metrics, get_protocol

    get_protocol(protocol, anatomy)  # a bad protocol fails before any work
    pairs = find_pairs(pairs_dir)
    table = MetricTable(protocol if protocol != "ldctbench" else f"ldctbench-{anatomy}")
    example = None
    for pair in tqdm(pairs, desc="patients", unit="patient", disable=not progress):
        low, full, oriented = load_pair_volumes(pair)
        denoised = denoise_volume(
            low,
            model,
            device=device,
            batch_size=batch_size,
            amp=amp,
            **({"axcodes": None} if oriented else {}),
            progress=False,
        )
        low_s, full_s, den_s = _slices(low), _slices(full), _slices(denoised)
        values = {
            "input": compute_ct_metrics(low_s, full_s, protocol, anatomy),
            "denoised": compute_ct_metrics(den_s, full_s, protocol, anatomy),
        }
        numbers = pair.get("slices") or list(range(low_s.shape[0]))
        for i, number in enumerate(numbers):
            table.add(
                pair["patient"],
                number,
                {g: {m: float(values[g][m][i]) for m in ("psnr", "ssim", "rmse")} for g in values},
            )
        if example is None:
            mid = low_s.shape[0] // 2
            example = (low_s[mid, 0].numpy(), den_s[mid, 0].numpy(), full_s[mid, 0].numpy(), pair["patient"])
    return table, example


def _figure(example, path: Path, window: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, denoised, full, patient = example
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, image, title in zip(axes, (low, denoised, full), ("low dose", "denoised", "normal dose")):
        ax.imshow(image.T, cmap="gray", vmin=window[0], vmax=window[1])
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"patient {patient}, window [{window[0]:g}, {window[1]:g}] HU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ldct_clip.inference import load_denoiser
    from ldct_clip.io import atomic_output, check_output_path

    pairs = Path(args.pairs).expanduser()
    if not pairs.is_dir():
        raise InputError(
            f"--pairs {args.pairs!r} is not a folder: give the folder with the low-/normal-dose pairs"
        )
    weights = Path(args.weights).expanduser()
    if not weights.is_file():
        raise InputError(f"--weights {args.weights!r} does not exist: give a trained model file (model.pt)")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    output = check_output_path(pairs, args.output, args.overwrite)
    model = load_denoiser(weights, device=args.device)
    table, example = evaluate_pairs(
        pairs,
        model,
        args.protocol,
        args.anatomy,
        args.device,
        args.batch_size,
        args.amp,
        not args.no_progress,
    )
    summary = table.summary()
    summary.update({"weights": str(weights.resolve()), "pairs": str(pairs.resolve())})
    with atomic_output(output, overwrite=args.overwrite, is_dir=True) as tmp:
        table.write_csv(tmp / "metrics.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        window = (-160.0, 240.0) if args.protocol != "ldctbench" else _ldctbench_window(args.anatomy)
        _figure(example, tmp / "example.png", window)
    print(table.format_table())
    print(f"wrote {output / 'metrics.csv'}, {output / 'summary.json'} and {output / 'example.png'}")
    return 0


def _ldctbench_window(anatomy: str) -> tuple[float, float]:
    from ldct_clip.metrics import LDCTBENCH_WINDOWS

    centre, width = LDCTBENCH_WINDOWS[anatomy]
    return centre - width / 2, centre + width / 2
