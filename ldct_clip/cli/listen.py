"""``ldct-clip listen``: a DICOM node that denoises every CT series C-STOREd to it and forwards the result."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ldct_clip.cli.overrides import add_model_options, model_overrides
from ldct_clip.errors import InputError


def _default_spool() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "ldct-clip" / "spool"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "listen",
        help="receive CT series by DICOM C-STORE, denoise each and C-STORE the derived series onward",
        description=(
            "Run a DICOM C-STORE SCP. Received instances are spooled to disk (before they are acknowledged) "
            "and grouped by series; a series is denoised when no instance of it has arrived for "
            "--series-timeout seconds, with the same bundle pipeline as `ldct-clip denoise`, and the derived "
            "series is sent to --forward. Stops cleanly on SIGTERM / Ctrl-C; the spool is taken up by the "
            "next run."
        ),
    )
    parser.add_argument("--ae-title", default="LDCTCLIP", help="AE title of this node (default: LDCTCLIP)")
    parser.add_argument("--port", type=int, default=11112, help="TCP port to listen on (default: 11112)")
    parser.add_argument(
        "--forward",
        required=True,
        metavar="AET@HOST:PORT",
        help="where derived series go, e.g. ORTHANC@pacs.example.org:4242",
    )
    parser.add_argument(
        "--series-timeout",
        type=float,
        default=10.0,
        help="seconds without a new instance after which a series is complete (default: 10)",
    )
    parser.add_argument(
        "--spool",
        type=Path,
        default=_default_spool(),
        help="folder for received instances; survives restarts (default: %(default)s)",
    )
    add_model_options(parser, weights_help="model weights (.pt); default: the bundle's models/model.pt")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port: give 1..65535")
    if not 0 < len(args.ae_title) <= 16 or "\\" in args.ae_title:
        raise InputError(f"--ae-title {args.ae_title!r} is not an AE title: give 1 to 16 characters")
    if args.series_timeout <= 0:
        raise InputError(f"--series-timeout {args.series_timeout} must be > 0 seconds")


def _overrides(args: argparse.Namespace) -> dict:
    """The bundle config overrides of the model options (as ``ldct-clip denoise`` sets them)."""
    return {"progress": False, "command": shlex.join(["ldct-clip", *sys.argv[1:]]), **model_overrides(args)}


def run(args: argparse.Namespace) -> int:
    from ldct_clip.apps.listener import BundleDenoiser, SeriesListener, run_listener
    from ldct_clip.inference import limit_heap_fragmentation
    from ldct_clip.io.dimse import parse_dicom_address

    _check_args(args)
    forward = parse_dicom_address(args.forward)
    limit_heap_fragmentation()  # a long-running process denoising one series after another
    denoiser = BundleDenoiser(args.bundle, _overrides(args))
    denoiser.load()  # bad weights or bundle: exit 2 now, not at the first series
    listener = SeriesListener(
        args.spool,
        forward,
        denoiser,
        ae_title=args.ae_title,
        port=args.port,
        series_timeout=args.series_timeout,
        log=lambda line: print(line, flush=True),
    )
    return run_listener(listener)
