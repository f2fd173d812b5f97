"""The ``ldct-clip`` command line: argument parsing only; the work is done by the library.

Each subcommand lives in its own module of this package with a ``register(subparsers)`` function that
adds its parser and sets ``func`` to a callable ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ldct_clip import __version__
from ldct_clip.errors import LdctClipError

# Order is the order of ``ldct-clip --help``.
COMMAND_MODULES = (
    "info",
    "import_reference",
    "benchmark",
    "simulate",
    "denoise",
    "listen",
    "train",
    "evaluate",
    "robustness",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldct-clip",
        description="Low-dose CT denoising with frozen CLIP features (Cheng et al., CVPR 2024), on MONAI.",
    )
    parser.add_argument("--version", action="version", version=f"ldct-clip {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # after parsing: --help and usage errors never pay for the import
        from ldct_clip.io.staging import install_signal_handlers

        install_signal_handlers()  # SIGTERM cleans up like Ctrl-C: no half output is left behind
        return int(args.func(args) or 0)
    except LdctClipError as error:
        print(f"ldct-clip {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldct-clip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
