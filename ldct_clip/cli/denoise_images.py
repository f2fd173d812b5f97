"""The image branch of ``ldct-clip denoise`` (``--bundle srgb_denoising`` or ``synthetic_denoising``).

Not a subcommand of its own: ``ldct_clip.cli.denoise`` hands over here when the bundle's metadata names an
image task, so one command denoises CT series and image files alike. The work is
:func:`ldct_clip.image_denoising.denoise_images`, the function the image bundles' ``inference.json`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldct_clip.errors import InputError


def run_images(args: argparse.Namespace, bundle: Path) -> int:
    """Denoise ``args.input`` (an image or a folder of images) into ``args.output`` with ``bundle``'s network."""
    from ldct_clip.image_denoising import ImageDenoiser, bundle_metadata, denoise_images, load_image_denoiser

    unsupported = [
        flag
        for flag, used in (
            ("--recursive", getattr(args, "recursive", False)),
            ("--series-uid", getattr(args, "series_uid", None)),
            ("--format", getattr(args, "format", "auto") != "auto"),
        )
        if used
    ]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)} apply to CT series only; the image bundle {bundle.name} takes an image "
            "file or a folder of images and writes each at its own format and bit depth"
        )
    channels = int(bundle_metadata(bundle)["network_data_format"]["inputs"]["image"]["num_channels"])
    model = load_image_denoiser(args.weights, bundle, device=args.device)
    denoiser = ImageDenoiser(model, device=args.device, channels=channels, amp=getattr(args, "amp", "fp32"))
    summary = denoise_images(
        args.input,
        args.output,
        denoiser,
        overwrite=args.overwrite,
        progress=not getattr(args, "no_progress", False),
    )
    n, seconds = summary["images"], summary["seconds"]
    megapixels = summary["pixels"] / 1e6
    where = summary["outputs"][0] if n == 1 else Path(args.output)
    print(
        f"denoised {n} image{'s' if n != 1 else ''} ({megapixels:.2f} MP) in {seconds:.1f} s "
        f"({megapixels / max(seconds, 1e-9):.2f} MP/s) -> {where}"
    )
    return 0
