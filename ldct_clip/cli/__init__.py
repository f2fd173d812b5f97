"""The ``ldct-clip`` command line: argument parsing only; the work is done by the library.

Each subcommand lives in its own module of this package with a ``register(subparsers)`` function that
adds its parser and sets ``func`` to a callable ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ldct_clip import __version__
from ldct_clip.errors import LdctClipError

# Order is the order of ``ldct-clip --help``.
COMMAND_MODULES = (
    "info",
    "import_reference",
    "export",
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


class _StderrHandler(logging.StreamHandler):
    """Notes of the library (``ldct_clip`` loggers, warnings and up) as ``ldct-clip COMMAND: message`` lines on
    the stderr of the moment (tests swap it)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(f"ldct-clip {command}: %(message)s"))
        self.setLevel(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notes = logging.getLogger("ldct_clip")
    handler = _StderrHandler(args.command)
    notes.addHandler(handler)
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
    finally:
        notes.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
