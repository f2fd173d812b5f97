"""``ldct-clip info``: what works now (versions, device, shipped weights) and, with ``--check``, unfinished outputs."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ldct_clip.errors import InputError, LdctClipError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show versions, device, the shipped weights, whether CLIP weights are there (to train), and "
        "(--check) unfinished outputs",
        description="Show versions, the compute device, the weights each shipped bundle holds (sha256-checked), "
        "whether the CLIP encoder weights needed to train are available locally (caches only; never "
        "downloads), and with --check PATH the leftovers of interrupted runs and the ldct-clip outputs that "
        "were changed since they were written.",
    )
    parser.add_argument("--clip-model", default="RN50", help="open_clip architecture (default: RN50)")
    parser.add_argument(
        "--encoder-weights",
        default="openai",
        help="open_clip pretrained tag or weight file to look for (default: openai, the paper's)",
    )
    parser.add_argument("--cache-dir", default=None, help="open_clip/Hugging Face cache directory")
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="PATH",
        help="only check PATH: list staging leftovers of killed runs and outputs whose manifest no longer "
        "matches (exit status 1 if any)",
    )
    parser.set_defaults(func=run)


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def device_lines() -> list[str]:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        return [f"device: cuda, {len(names)} GPU(s): {', '.join(names)}; bf16: {bf16}"]
    return [f"device: cpu (no CUDA GPU visible), {torch.get_num_threads()} torch threads; bf16: CPU autocast"]


def shipped_weights_lines() -> list[str]:
    """One line per shipped bundle: its weights found and sha256-verified, missing, or damaged."""
    from ldct_clip.bundles import available_bundles, bundle_metadata, bundle_weights, expected_weights_sha256

    lines = []
    for name in available_bundles():
        try:
            metadata = bundle_metadata(name)
            label = f"bundle {name} {metadata.get('version', '')}".rstrip()
            path = bundle_weights(name, hint="reinstall ldct-clip or train your own (ldct-clip train)")
        except LdctClipError as error:
            if "ships no trained weights" in str(error):
                lines.append(f"bundle {name}: ships no trained weights; train them with `ldct-clip train`")
            else:
                lines.append(f"bundle {name}: WEIGHTS NOT USABLE: {error}")
            continue
        expected = expected_weights_sha256(metadata, path.parents[1], path)
        shipped = metadata.get("shipped_weights") or {}
        demo = (
            " (demo weights, not a model for real use)"
            if shipped.get("demo") or "demo" in str(shipped.get("note", "")).lower()
            else ""
        )
        check = f"sha256 {expected[:12]} verified" if expected else "not checked (a user's bundle)"
        lines.append(f"{label}: weights {path} found, {check}{demo}; denoising with this bundle works now")
    return lines


def weights_line(clip_model: str, encoder_weights: str, cache_dir: str | None) -> str:
    from ldct_clip.networks.clip_weights import (
        cached_pretrained_file,
        download_instructions,
        hub_offline,
        looks_like_path,
    )

    label = f"CLIP weights {clip_model}/{encoder_weights} (needed only to train: `ldct-clip train`; denoising does not need them)"
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


def check_lines(root: Path) -> list[str]:
    """What ``--check`` reports: leftovers of killed runs and outputs changed since ldct-clip wrote them."""
    from ldct_clip.io.manifest import audit_outputs
    from ldct_clip.io.staging import find_leftovers

    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    leftovers = find_leftovers(root)
    changed = audit_outputs(root)
    lines = []
    if leftovers:
        lines.append(
            f"{len(leftovers)} leftover(s) of interrupted ldct-clip runs under {root} (the next run on the same "
            "output removes its own; otherwise delete them):"
        )
        lines += [f"  {path}" for path in leftovers]
    if changed:
        lines.append(
            f"{len(changed)} ldct-clip output(s) under {root} changed since they were written (--overwrite refuses them):"
        )
        lines += [f"  {path}: {'; '.join(problems)}" for path, problems in changed]
    if not lines:
        lines.append(f"{root}: no leftovers of interrupted runs; every ldct-clip output matches its manifest")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.check is not None:
        lines = check_lines(args.check)
        print("\n".join(lines))
        return 1 if len(lines) > 1 else 0
    import torch

    from ldct_clip import __version__

    lines = [
        f"ldct-clip {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"monai {_version('monai')}",
        f"open_clip {_version('open_clip_torch')}",
        *device_lines(),
        *shipped_weights_lines(),
        weights_line(args.clip_model, args.encoder_weights, args.cache_dir),
    ]
    print("\n".join(lines))
    return 0
