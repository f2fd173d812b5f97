"""``ldct-clip denoise``: a CT series (or every series under a folder, or images) in, its denoised twin out.

Argument checking and overrides only: the work is the bundle's ``inference.json`` run by
:class:`ldct_clip.bundles.BundlePipeline`, one evaluator run per series. Everything that can be checked is
checked before the weights are loaded: the input's headers, every output (layout, never inside the input,
never over something ldct-clip did not write), and that each destination is writable with room for the
result. Under ``torchrun --nproc_per_node N`` with ``--recursive``, rank r takes every N-th series.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from ldct_clip.cli.overrides import add_model_options, model_overrides
from ldct_clip.errors import InputError, LdctClipError

OUTPUT_FORMATS = ("auto", "dicom", "nifti", "both")
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
            "and write a derived DICOM series (same patient, study and frame of reference) and/or NIfTI. "
            "With an image bundle (--bundle srgb_denoising or synthetic_denoising), denoise image files."
        ),
    )
    parser.add_argument(
        "input",
        help="DICOM series folder or file, NIfTI, or other ITK volume; a DICOMweb series URL; or images",
    )
    parser.add_argument(
        "output",
        help="output folder (DICOM, both, or --recursive), a .nii.gz file for --format nifti, or a DICOMweb root",
    )
    add_model_options(
        parser,
        weights_help=f"model weights (.pt); default: the bundle's models/model.pt (the low-dose CT bundle ships "
        f"demo weights); {WEIGHTS_HELP}",
    )
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="auto",
        help="output format; auto: DICOM for DICOM input, NIfTI otherwise (default: auto)",
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
    parser.add_argument(
        "--include-derived",
        action="store_true",
        help="also read series that ldct-clip itself denoised (left out by default, so that a folder of "
        "inputs and outputs is not denoised twice)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs that ldct-clip wrote (checked against their manifest; anything else "
        "is never replaced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    pacs = parser.add_argument_group(
        "DICOMweb (INPUT a series URL .../studies/UID/series/UID, or a study URL with --recursive; OUTPUT a "
        "DICOMweb root: the derived series is stored in the same study)"
    )
    pacs.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        help="file with one USER:PASSWORD line for HTTP basic auth (default: LDCT_CLIP_DICOMWEB_USER/_PASSWORD)",
    )
    pacs.add_argument("--token", default=None, help="bearer token (default: LDCT_CLIP_DICOMWEB_TOKEN)")
    pacs.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    pacs.add_argument("--ca-bundle", type=Path, default=None, help="CA certificates (PEM) to verify TLS with")
    pacs.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the server per request (default: 30)"
    )
    parser.set_defaults(func=run)


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_args(args: argparse.Namespace) -> None:
    if args.recursive and args.series_uid:
        raise InputError("--series-uid and --recursive exclude each other: drop one")
    if args.timeout <= 0:
        raise InputError(f"--timeout {args.timeout} must be positive")
    if not _is_url(args.input) and not Path(args.input).expanduser().exists():
        raise InputError(f"input {args.input} does not exist; check the path")
    if _is_url(args.output) and args.format not in ("auto", "dicom"):
        raise InputError(f"--format {args.format}: a DICOMweb destination stores DICOM only; drop --format")


def _overrides(args: argparse.Namespace) -> dict:
    # --amp auto keeps the bundle's own default (the image bundles run float32 on CPUs)
    return {
        **({} if args.amp == "auto" else {"amp": args.amp}),
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
        "command": shlex.join(["ldct-clip", *sys.argv[1:]]),
        "input": args.input,
        "output_dir": args.output,
        "jobs": [],  # planned here: one evaluator run per series (per image folder)
        **model_overrides(args),
    }


def _denoise_ct(pipeline, job: dict) -> str:
    start = time.perf_counter()
    output = pipeline.run([job])
    seconds = time.perf_counter() - start
    pred = output["pred"]
    n_slices = int(pred.shape[-1])
    where = ", ".join(pred.meta["saved_to"].values())
    return f"denoised {n_slices} slices in {seconds:.1f} s ({n_slices / max(seconds, 1e-9):.2f} slices/s) -> {where}"


def _denoise_images(pipeline, jobs: list[dict], output: str) -> str:
    """One evaluator run over every image: its output folder is published whole when the run completes."""
    from PIL import Image

    start = time.perf_counter()
    pipeline.run(jobs)
    seconds = time.perf_counter() - start
    pixels = 0
    for job in jobs:
        with Image.open(job["image"]) as image:  # the header only: the size
            pixels += image.width * image.height
    n, megapixels = len(jobs), pixels / 1e6
    where = jobs[0]["output"] if n == 1 else output
    return (
        f"denoised {n} image{'s' if n != 1 else ''} ({megapixels:.2f} MP) in {seconds:.1f} s "
        f"({megapixels / max(seconds, 1e-9):.2f} MP/s) -> {where}"
    )


def _is_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


class _DicomWeb:
    """The DICOMweb side of a run: the series URLs it reads and the root it stores the derived series into."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ldct_clip.io import dicomweb

        self.api = dicomweb
        self.timeout = args.timeout
        self.auth = dicomweb.parse_auth(
            args.auth_file, args.token, insecure=args.insecure, ca_bundle=args.ca_bundle
        )
        self.source = args.input if _is_url(args.input) else None
        self.sink = args.output if _is_url(args.output) else None
        if self.sink:  # a wrong or refusing destination is found before anything is fetched or computed
            self.api.check_store_target(self.sink, self.auth, timeout=self.timeout)

    def series_urls(self, recursive: bool) -> list[str]:
        if not recursive:
            return [self.source]
        return self.api.list_ct_series(self.source, self.auth, timeout=self.timeout)

    def fetch(self, url: str, folder: Path) -> Path:
        return self.api.fetch_series(url, folder, self.auth, timeout=self.timeout)

    def store(self, folder: str) -> str:
        return str(self.api.store_series(Path(folder), self.sink, self.auth, timeout=self.timeout))


def _ct_work(pipeline, args: argparse.Namespace, web: _DicomWeb | None, scratch: Path):
    """``(label, job)`` for every series, in the same order on every rank; a job is a dict, or a callable
    making it (a series fetched from DICOMweb only when its turn comes)."""
    sink = web is not None and web.sink is not None
    if web is not None and web.source is not None:
        for i, url in enumerate(web.series_urls(args.recursive)):

            def fetch_and_plan(url=url, i=i) -> dict:
                work = scratch / f"series{i}"
                source = web.fetch(url, work / "source")
                output = work / "derived" if sink else Path(args.output)
                if args.recursive and not sink:
                    output = output / url.rstrip("/").rsplit("/", 1)[-1]
                return _plan_ct(source, output, args, "dicom" if sink else args.format, recursive=False)[0]

            yield url, fetch_and_plan
        return
    output = scratch / "derived" if sink else Path(args.output)
    for job in _plan_ct(args.input, output, args, "dicom" if sink else args.format, args.recursive):
        yield job["source"], job


def _plan_ct(source, output, args: argparse.Namespace, output_format: str, recursive: bool) -> list[dict]:
    from ldct_clip.io.jobs import plan_ct_jobs

    return plan_ct_jobs(
        source,
        output,
        output_format=output_format,
        series_uid=args.series_uid,
        recursive=recursive,
        include_derived=args.include_derived,
        overwrite=args.overwrite,
        errors="collect",
    )


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ldct_clip.bundles import DEFAULT_CT_BUNDLE, BundlePipeline
    from ldct_clip.inference import limit_heap_fragmentation
    from ldct_clip.io.jobs import plan_image_jobs

    limit_heap_fragmentation()
    _check_args(args)
    pipeline = BundlePipeline(args.bundle or DEFAULT_CT_BUNDLE, overrides=_overrides(args))
    web = _DicomWeb(args) if _is_url(args.input) or _is_url(args.output) else None
    if pipeline.task != "ct":
        _refuse_ct_options(pipeline, args, web)
        jobs = plan_image_jobs(args.input, args.output, overwrite=args.overwrite)
        pipeline.load_weights()  # read once, after every check
        print(_denoise_images(pipeline, jobs, args.output))
        return 0
    rank, world = _distributed()
    group = _init_group(world)
    failures = 0
    try:
        with tempfile.TemporaryDirectory(prefix="ldct-clip-") as scratch:
            work = list(_ct_work(pipeline, args, web, Path(scratch)))
            skipped = next((job.get("skipped") for _, job in work if isinstance(job, dict)), "")
            if skipped:
                print(f"ldct-clip denoise: {skipped}", file=sys.stderr)
            pipeline.load_weights()  # read once, after every check
            mine = work[rank::world] if args.recursive else (work if rank == 0 else [])
            for label, job in mine:
                try:
                    job = job() if callable(job) else job
                    if "error" in job:
                        raise InputError(job["error"])
                    print(_denoise_ct(pipeline, job))
                    if web is not None and web.sink:
                        print(web.store(job["output"]))
                except LdctClipError as error:
                    if not args.recursive:
                        raise
                    failures += 1
                    print(f"ldct-clip denoise: error: {label}: {error}", file=sys.stderr)
    finally:
        failures = _finish_group(group, failures)
    if failures:
        print(f"ldct-clip denoise: {failures} series failed", file=sys.stderr)
        return 1
    return 0


def _refuse_ct_options(pipeline, args: argparse.Namespace, web) -> None:
    unsupported = [
        flag
        for flag, used in (
            ("--recursive", args.recursive),
            ("--series-uid", args.series_uid),
            ("--format", args.format != "auto"),
            ("a DICOMweb URL", web is not None),
        )
        if used
    ]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)} apply to CT series only; the image bundle {pipeline.root.name} takes an "
            "image file or a folder of images and writes each at its own format and bit depth"
        )


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
