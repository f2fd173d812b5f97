"""``--set KEY=VALUE``: any bundle config id overridden from the command line, as ``monai.bundle run --KEY VALUE``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ldct_clip.errors import InputError

__all__ = ["add_set_option", "json_value", "parse_set_options"]


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
