"""Command-line options that become bundle config overrides: the model options every command that runs the
model shares (``--bundle``, ``--weights``, ``--device``, ``--batch``, ``--self-ensemble``) and ``--set KEY=VALUE`` for any config
id, as ``monai.bundle run --KEY VALUE`` would."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ldct_clip.errors import InputError


def add_model_options(
    parser: argparse.ArgumentParser, weights_help: str, bundle_help: str | None = None
) -> None:
    """``--bundle``, ``--weights``, ``--device``, ``--batch`` (also ``--batch-size``), ``--self-ensemble`` and
    ``--set``."""
    parser.add_argument(
        "--bundle",
        default=None,
        help=bundle_help or "MONAI bundle folder or shipped bundle name (default: lowdose_ct_denoising)",
    )
    parser.add_argument("--weights", type=Path, default=None, help=weights_help)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--batch",
        "--batch-size",
        dest="batch",
        type=int,
        default=None,
        metavar="N",
        help="slices per forward pass (default: 2 on a CPU, 16 on a GPU); lowered, with a note, to what fits "
        "the memory budget (volume + 1.5 GB on a CPU, the free memory of a GPU)",
    )
    parser.add_argument(
        "--self-ensemble",
        action="store_true",
        help="average the network over each slice's 8 rotations and mirror images (4 for non-square images): "
        "a little more accurate, 8x the time (bundle config id self_ensemble; gains in benchmarks/README.md)",
    )
    add_set_option(parser)


def model_overrides(args: argparse.Namespace) -> dict:
    """The config overrides of the model options (``add_model_options``), ``--set`` last.

    Raises:
        InputError: a batch below 1, a weights file that does not exist, a malformed ``--set``.
    """
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch} must be >= 1")
    values: dict = {"device": args.device, "batch_size": args.batch}
    if args.weights is not None:
        weights = Path(args.weights).expanduser()
        if not weights.is_file():
            raise InputError(f"weights file {args.weights} does not exist; check the path")
        values["ckpt_path"] = str(weights.resolve())
    if args.self_ensemble:  # only when asked: otherwise the bundle's own default stands
        values["self_ensemble"] = True
    values.update(parse_set_options(args.set))
    return values


__all__ = ["add_model_options", "add_set_option", "json_value", "model_overrides", "parse_set_options"]


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--set KEY=VALUE`` option to a subcommand that runs a bundle config."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a bundle config id (JSON value), e.g. --set network_def#encoder_bn='\"frozen\"'; "
        "repeatable",
    )


def json_value(text: str):
    """A JSON value, or the text itself when it is not JSON (so ``--set device=cpu`` needs no quotes)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_set_options(items: Sequence[str]) -> dict:
    """``["a=1", "b#c=[1,2]"]`` -> ``{"a": 1, "b#c": [1, 2]}``.

    Raises:
        InputError: an item without ``=`` or with an empty key.
    """
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r} is not KEY=VALUE (e.g. --set batch_size=4)")
        overrides[key.strip()] = json_value(value)
    return overrides
