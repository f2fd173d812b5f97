"""``ldct-clip denoise``: a CT series (or every series under a folder) in, its denoised twin out.

The work is the bundle's pipeline, done by the same library pieces its ``inference.json`` uses: the
network and weights from the bundle (``ldct_clip.inference.load_denoiser``), ``LoadCT`` ->
``denoise_volume`` -> ``SaveCT``. Under ``torchrun --nproc_per_node N`` with ``--recursive``, rank r
takes every N-th series.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ldct_clip.errors import InputError, LdctClipError, WeightsError
from ldct_clip.transforms.io import OUTPUT_FORMATS, check_outputs

WEIGHTS_HELP = (
    "trained weights come from `ldct-clip train` (your data) or `ldct-clip import-reference` (the authors' "
    "CLIPDenoising checkpoint); see the bundle's docs/README.md"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "denoise",
        help="denoise a CT series or volume (DICOM in: derived DICOM series out; NIfTI in: NIfTI out)",
        description=(
            "Denoise a low-dose CT volume slice by slice with the CLIP-feature denoiser of the MONAI bundle "
            "and write a derived DICOM series (same patient, study and frame of reference) and/or NIfTI."
        ),
    )
    parser.add_argument("input", type=Path, help="DICOM series folder or file, NIfTI, or other ITK volume")
    parser.add_argument(
        "output",
        type=Path,
        help="output folder (DICOM, both, or --recursive), or a .nii.gz file for --format nifti",
    )
    parser.add_argument(
        "--bundle",
        default=None,
        help="MONAI bundle folder or shipped bundle name (default: lowdose_ct_denoising)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"model weights (.pt); default: the bundle's models/model.pt (the low-dose CT bundle ships demo weights); {WEIGHTS_HELP}",
    )
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="auto",
        help="output format; auto: DICOM for DICOM input, NIfTI otherwise (default: auto)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--batch", type=int, default=None, help="slices per forward pass (default: 2 CPU, 16 GPU)"
    )
    parser.add_argument(
        "--amp",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "bf16", "fp16", "fp32"),
        help="mixed precision: --amp alone for bf16 (fp16 on GPUs without bf16); default auto: "
        "the measured default for the device (see benchmarks/README.md)",
    )
    parser.add_argument(
        "--series-uid", default=None, help="SeriesInstanceUID to take when INPUT holds several"
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        help="denoise every CT series under INPUT, each into its own folder",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_args(args: argparse.Namespace) -> None:
    if not args.input.exists():
        raise InputError(f"input {args.input} does not exist")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch} must be >= 1")
    if args.recursive and args.series_uid:
        raise InputError("--series-uid and --recursive exclude each other: drop one")
    if args.recursive:
        from ldct_clip.io import check_output_path

        # outputs inside the searched tree would be found as inputs by the next run
        check_output_path(args.input, args.output, overwrite=True)


def _jobs(args: argparse.Namespace) -> list[tuple[Path, str | None, Path]]:
    """(input, series UID, output) of every series to denoise."""
    if not args.recursive:
        return [(args.input, args.series_uid, args.output)]
    from ldct_clip.io import find_ct_series

    root = args.input
    # the same order on every rank: rank r takes jobs r, r + N, ...
    series = sorted(find_ct_series(root), key=lambda s: (str(s.path), s.uid))
    if not series:
        raise InputError(
            f"no CT series found under {root}: check the folder, or drop --recursive for a single file"
        )
    per_folder: dict[Path, int] = {}
    for s in series:
        per_folder[Path(s.path)] = per_folder.get(Path(s.path), 0) + 1
    jobs = []
    for s in series:
        folder = Path(s.path)
        relative = folder.relative_to(root) if folder != root and folder.is_relative_to(root) else Path()
        out = args.output / relative
        if per_folder[folder] > 1:
            out = out / s.uid
        jobs.append((folder, s.uid, out))
    return jobs


def _denoise_one(source: Path, series_uid: str | None, output: Path, model, args: argparse.Namespace) -> None:
    from ldct_clip.inference import denoise_volume
    from ldct_clip.transforms.io import LoadCT, SaveCT

    volume = LoadCT(series_uid=series_uid)(source)
    # Every target is checked before the (long) denoising: a refusal costs nothing and writes nothing.
    check_outputs(source, output, args.format, str(volume.meta.get("source_kind", "")), args.overwrite)
    n_slices = int(volume.shape[-1])
    start = time.perf_counter()
    denoised = denoise_volume(
        volume,
        model,
        device=args.device,
        batch_size=args.batch,
        amp=args.amp,
        inplace=True,  # the noisy volume is not needed afterwards: hold one volume, not two
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    SaveCT(output, output_format=args.format, overwrite=args.overwrite)(denoised)
    where = ", ".join(denoised.meta["saved_to"].values())
    print(
        f"denoised {n_slices} slices in {seconds:.1f} s ({n_slices / max(seconds, 1e-9):.2f} slices/s) -> {where}"
    )


def run(args: argparse.Namespace) -> int:
    from ldct_clip.bundles import DEFAULT_CT_BUNDLE, resolve_bundle
    from ldct_clip.inference import limit_heap_fragmentation, load_denoiser, resolve_device

    limit_heap_fragmentation()
    _check_args(args)
    bundle = resolve_bundle(args.bundle or DEFAULT_CT_BUNDLE)
    args.weights = _weights(args.weights, bundle)
    from ldct_clip.image_denoising import bundle_task

    if bundle_task(bundle) != "ct":  # sRGB / synthetic-noise bundles: image files in and out
        from ldct_clip.cli.denoise_images import run_images

        return run_images(args, bundle)
    rank, world = _distributed()
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % _cuda_count()}")
    args.device = device

    group = _init_group(world)
    failures = 0
    try:
        jobs = _jobs(args)
        mine = jobs[rank::world] if args.recursive else (jobs if rank == 0 else [])
        if mine:
            from ldct_clip.bundles import bundle_network_def

            model = load_denoiser(args.weights, network_def=lambda: bundle_network_def(bundle), device=device)
        for source, series_uid, output in mine:
            try:
                _denoise_one(source, series_uid, output, model, args)
            except LdctClipError as error:
                if not args.recursive:
                    raise
                failures += 1
                print(f"ldct-clip denoise: error: {source}: {error}", file=sys.stderr)
    finally:
        failures = _finish_group(group, failures)
    if failures:
        print(f"ldct-clip denoise: {failures} series failed", file=sys.stderr)
        return 1
    return 0


def _weights(weights: Path | None, bundle: Path) -> Path:
    """The given weights file, else the bundle's ``models/model.pt`` (sha256-checked when shipped)."""
    if weights is None:
        from ldct_clip.bundles import bundle_weights

        return bundle_weights(bundle, hint=f"pass --weights FILE; {WEIGHTS_HELP}")
    if not weights.is_file():
        raise WeightsError(f"weights file {weights} does not exist; {WEIGHTS_HELP}")
    return weights


def _cuda_count() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _init_group(world: int):
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def _finish_group(dist, failures: int) -> int:
    """Total failures of all ranks (a rank that failed makes every rank exit non-zero)."""
    if dist is None:
        return failures
    import torch

    total = torch.tensor([failures])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return int(total.item())
