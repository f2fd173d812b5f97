"""``ldct-clip info``: versions, compute device, and where the CLIP encoder weights would come from."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ldct_clip import __version__
from ldct_clip.networks.clip_weights import (
    cached_pretrained_file,
    download_instructions,
    hub_offline,
    looks_like_path,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show versions, device and whether the CLIP encoder weights are available",
        description="Show versions, the compute device and whether the CLIP encoder weights are available "
        "locally (caches only; never downloads).",
    )
    parser.add_argument("--clip-model", default="RN50", help="open_clip architecture (default: RN50)")
    parser.add_argument(
        "--encoder-weights",
        default="openai",
        help="open_clip pretrained tag or weight file to look for (default: openai, the paper's)",
    )
    parser.add_argument("--cache-dir", default=None, help="open_clip/Hugging Face cache directory")
    parser.set_defaults(func=run)


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def device_lines() -> list[str]:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        return [f"device: cuda, {len(names)} GPU(s): {', '.join(names)}; bf16: {bf16}"]
    return [f"device: cpu (no CUDA GPU visible), {torch.get_num_threads()} torch threads; bf16: CPU autocast"]


def weights_line(clip_model: str, encoder_weights: str, cache_dir: str | None) -> str:
    label = f"CLIP weights {clip_model}/{encoder_weights}"
    if looks_like_path(encoder_weights):
        path = Path(encoder_weights).expanduser()
        if path.is_file():
            return f"{label}: file {path} ({path.stat().st_size / 2**20:.1f} MiB)"
        return f"{label}: NOT AVAILABLE, {path} does not exist"
    found = cached_pretrained_file(clip_model, encoder_weights, cache_dir)
    if found is not None:
        kind = "Hugging Face cache" if "models--" in str(found) else "open_clip download cache"
        return f"{label}: available in the {kind}: {found}"
    mode = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return f"{label}: NOT AVAILABLE locally{mode}; {download_instructions(clip_model, encoder_weights)}"


def run(args: argparse.Namespace) -> int:
    lines = [
        f"ldct-clip {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"monai {_version('monai')}",
        f"open_clip {_version('open_clip_torch')}",
        *device_lines(),
        weights_line(args.clip_model, args.encoder_weights, args.cache_dir),
    ]
    print("\n".join(lines))
    return 0
