"""Where the MONAI bundles of ldct-clip live, and what they ship.

The bundles are kept at the top of the repository (``bundles/<name>``), where MONAI users expect them.
A wheel carries a copy inside this package (``ldct_clip/bundles/<name>``, put there by setup.py's
build step), so :func:`resolve_bundle` looks in the package first and then in the checkout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from monai.bundle import ConfigParser

from ldct_clip.errors import InputError, WeightsError
from ldct_clip.networks.clip_weights import sha256_of

__all__ = [
    "DEFAULT_CT_BUNDLE",
    "SHIPPED_WEIGHTS",
    "TASKS",
    "available_bundles",
    "bundle_metadata",
    "bundle_network_def",
    "bundle_search_paths",
    "bundle_weights",
    "config_bundle_root",
    "expected_weights_sha256",
    "is_shipped_bundle",
    "resolve_bundle",
]

#: The bundle ``ldct-clip denoise`` runs unless ``--bundle`` says otherwise.
DEFAULT_CT_BUNDLE = "lowdose_ct_denoising"

#: Where a bundle keeps its trained weights (MONAI's convention; ``ckpt_path`` of inference.json).
SHIPPED_WEIGHTS = Path("models") / "model.pt"

#: ``denoising_task`` of a bundle's metadata: what its inference reads and writes.
TASKS = ("ct", "srgb", "synthetic")


def bundle_search_paths() -> list[Path]:
    """Folders that hold bundles: inside the installed package (wheel), then the source checkout."""
    package = Path(__file__).resolve().parent
    return [package, package.parents[1] / "bundles"]


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def available_bundles() -> list[str]:
    """Names of the bundles found on :func:`bundle_search_paths`."""
    names = {
        p.name for root in bundle_search_paths() if root.is_dir() for p in root.iterdir() if _is_bundle(p)
    }
    return sorted(names)


def resolve_bundle(name_or_path: str | os.PathLike = DEFAULT_CT_BUNDLE) -> Path:
    """The root folder of a bundle, given its folder or the name of a bundle shipped with ldct-clip.

    Args:
        name_or_path: a bundle folder (with ``configs/metadata.json``) or a shipped bundle's name.

    Raises:
        InputError: neither a bundle folder nor the name of a shipped bundle.
    """
    candidate = Path(name_or_path).expanduser()
    if _is_bundle(candidate):
        return candidate.resolve()
    if candidate.name == str(name_or_path):
        for root in bundle_search_paths():
            if _is_bundle(root / candidate.name):
                return (root / candidate.name).resolve()
    raise InputError(
        f"{str(name_or_path)!r} is not a MONAI bundle (no configs/metadata.json there) nor a shipped bundle "
        f"name; give a bundle folder or one of: {', '.join(available_bundles()) or 'none found'}"
    )


def is_shipped_bundle(bundle_root: str | os.PathLike) -> bool:
    """Whether ``bundle_root`` is a bundle shipped with ldct-clip (in the wheel or the checkout), as opposed
    to a user's copy, whose ``models/model.pt`` holds whatever that user trained."""
    root = Path(bundle_root).resolve()
    return any(root.parent == p.resolve() for p in bundle_search_paths())


def bundle_metadata(bundle: str | os.PathLike) -> dict:
    """The bundle's ``configs/metadata.json`` (a bundle name or folder, see :func:`resolve_bundle`).

    For callers that need the metadata without running the bundle; a running bundle has it as ``@_meta_``.
    """
    path = resolve_bundle(bundle) / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(
            f"cannot read the bundle metadata {path}: {error}; fix or restore the file"
        ) from error


def expected_weights_sha256(
    meta: dict, bundle_root: str | os.PathLike, ckpt_path: str | os.PathLike
) -> str | None:
    """The sha256 the weights at ``ckpt_path`` must have: the metadata's ``shipped_weights`` sha256 when
    ``ckpt_path`` is the ``models/model.pt`` of a bundle shipped with ldct-clip, else None (unchecked)."""
    expected = (meta.get("shipped_weights") or {}).get("sha256")
    if not expected or not is_shipped_bundle(bundle_root):
        return None
    shipped = (Path(bundle_root) / SHIPPED_WEIGHTS).resolve()
    return str(expected).lower() if Path(ckpt_path).resolve() == shipped else None


def bundle_weights(bundle: str | os.PathLike = DEFAULT_CT_BUNDLE, hint: str = "pass --weights FILE") -> Path:
    """The trained weights a bundle holds (``models/model.pt``), sha256-checked when shipped with ldct-clip.

    For reports that name the weights without running the bundle (``ldct-clip info``); a running bundle
    checks them while loading them (:class:`ldct_clip.inference.WeightsLoader`), reading the file once.

    Args:
        bundle: bundle folder or shipped bundle name.
        hint: what the user can do instead, for the error messages.

    Raises:
        WeightsError: no ``models/model.pt``, or one whose sha256 differs from the metadata's (a damaged
            copy, or a Git LFS pointer file instead of the weights).
    """
    root = resolve_bundle(bundle)
    path = root / SHIPPED_WEIGHTS
    metadata = bundle_metadata(root)
    if not path.is_file():
        shipped = (
            "its weights are missing" if metadata.get("shipped_weights") else "it ships no trained weights"
        )
        raise WeightsError(f"bundle {root.name} has no {SHIPPED_WEIGHTS} ({shipped}): {hint}")
    expected = expected_weights_sha256(metadata, root, path)
    if expected:
        actual = sha256_of(path)
        if actual != expected:
            raise WeightsError(
                f"{path} is not the weights bundle {root.name} ships (sha256 {actual[:12]}..., metadata.json "
                f"says {expected[:12]}...): the copy is damaged or a Git LFS pointer; reinstall ldct-clip, "
                f"or {hint}"
            )
    return path


def bundle_network_def(bundle: str | os.PathLike = DEFAULT_CT_BUNDLE):
    """The bundle's ``network_def`` from its ``inference.json`` (the network its weights load into)."""
    parser = ConfigParser()
    parser.read_config(str(resolve_bundle(bundle) / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def config_bundle_root(default: str = ".") -> str:
    """The bundle folder of the config being run: ``bundle_root`` of the bundles' configs.

    MONAI's workflow does not tell a config where its file is; the model-zoo convention is
    ``"bundle_root": "."`` (run from the bundle folder, or pass ``--bundle_root``). When the config is run by
    ``python -m monai.bundle run --config_file COPY/configs/inference.json`` from elsewhere, the folder is on
    that command line, so a copied bundle runs with its own configs and ``models/`` from anywhere. ldct-clip's
    own commands always pass ``bundle_root`` explicitly.
    """
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            first = value.strip("[]() ").split(",")[0].strip().strip("'\"")
            config = Path(first).expanduser()
            if config.parent.name == "configs" and _is_bundle(config.parent.parent):
                return str(config.parent.parent.resolve())
    return default
