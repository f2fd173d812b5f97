"""``ldct-clip import-reference``: convert a checkpoint of the reference code to ldct-clip's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldct_clip.errors import OutputError

# The choices of ldct_clip.networks.reference.REFERENCE_KEYS and ldct_clip.networks.denoiser.ENCODER_BN_MODES,
# spelled out so that building the parser imports no torch (tests/test_import_reference checks they agree).
REFERENCE_KEYS = ("params", "params_ema")
ENCODER_BN_MODES = ("batch_stats", "frozen")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-reference",
        help="convert a CLIPDenoising (BasicSR) checkpoint to an ldct-clip checkpoint",
        description=(
            "Read a checkpoint of the reference implementation (alwaysuu/CLIPDenoising, BasicSR: "
            "{'params': ...}, {'params_ema': ...} or a bare state dict), infer the network configuration "
            "from its tensors, drop the unused encoder.layer4.* and write an ldct-clip checkpoint "
            "(loadable with ldct_clip.networks.load_model)."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="reference checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="ldct-clip checkpoint to write (.pt)")
    parser.add_argument(
        "--key",
        choices=("auto", *REFERENCE_KEYS),
        default="auto",
        help="which BasicSR entry to take; auto: 'params' if present (what the reference test scripts "
        "load), else 'params_ema', else the file is the state dict (default: auto)",
    )
    parser.add_argument(
        "--aug-level",
        type=float,
        default=0.025,
        help="feature augmentation level stored with the network (paper: 0.025 CT/synthetic, 0.05 sRGB; "
        "only used if you fine-tune; default 0.025)",
    )
    parser.add_argument(
        "--encoder-bn",
        choices=ENCODER_BN_MODES,
        default="batch_stats",
        help="encoder BatchNorm mode to store",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if an earlier import-reference wrote it"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ldct_clip.io.preflight import check_output
    from ldct_clip.io.staging import staged_output
    from ldct_clip.networks import (
        CLIPDenoiser,
        infer_network_config,
        load_reference_state_dict,
        read_reference_checkpoint,
        save_checkpoint,
    )

    source, output = Path(args.checkpoint), Path(args.output)
    if not output.parent.is_dir():
        raise OutputError(f"folder {output.parent} does not exist; create it first")
    check_output(source, output, args.overwrite, is_dir=False)  # never over a file ldct-clip did not write
    state = read_reference_checkpoint(source, key=args.key)
    config = infer_network_config(state)
    model = CLIPDenoiser(**config, aug_level=args.aug_level, encoder_bn=args.encoder_bn)
    load_reference_state_dict(model, state)
    dropped = sum(1 for k in state if k.startswith(("encoder.layer4.", "encoder.attnpool.")))
    with staged_output(output, overwrite=args.overwrite) as staging:
        save_checkpoint(staging, model, extra={"imported_from": str(source)})
    shown = ", ".join(f"{k}={v}" for k, v in model.config.items())
    print(
        f"imported {len(state) - dropped} tensors from {source} (dropped {dropped} unused encoder.layer4 tensors)"
    )
    print(f"network: {shown}")
    print(f"wrote {output}")
    return 0
