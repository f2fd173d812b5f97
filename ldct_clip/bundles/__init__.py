"""Where the MONAI bundles shipped with ldct-clip live, in a source checkout and in an installed wheel.

The bundles are kept at the top of the repository (``bundles/<name>``), where MONAI users expect them.
A wheel carries a copy inside this package (``ldct_clip/bundles/<name>``, put there by setup.py's
build step), so ``resolve_bundle`` looks next to this file first and then in the checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldct_clip.errors import InputError, WeightsError

__all__ = [
    "DEFAULT_CT_BUNDLE",
    "SHIPPED_WEIGHTS",
    "available_bundles",
    "bundle_network_def",
    "bundle_search_paths",
    "bundle_weights",
    "resolve_bundle",
]

#: The bundle ``ldct-clip denoise`` runs unless ``--bundle`` says otherwise.
DEFAULT_CT_BUNDLE = "lowdose_ct_denoising"

#: Where a bundle keeps its trained weights (MONAI's convention; ``ckpt_path`` of inference.json).
SHIPPED_WEIGHTS = Path("models") / "model.pt"


def bundle_search_paths() -> list[Path]:
    """Folders that hold bundles: inside the installed package (wheel), then the source checkout."""
    here = Path(__file__).resolve().parent
    return [here, here.parents[1] / "bundles"]


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def available_bundles() -> list[str]:
    """Names of the bundles found on :func:`bundle_search_paths`."""
    names = {
        p.name for root in bundle_search_paths() if root.is_dir() for p in root.iterdir() if _is_bundle(p)
    }
    return sorted(names)


def resolve_bundle(name_or_path: str | Path = DEFAULT_CT_BUNDLE) -> Path:
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


def bundle_network_def(bundle: str | os.PathLike = DEFAULT_CT_BUNDLE):
    """The bundle's ``network_def`` from its ``inference.json`` (the network bare state dicts load into).

    Args:
        bundle: bundle folder or shipped bundle name.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(resolve_bundle(bundle) / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def bundle_weights(bundle: str | os.PathLike = DEFAULT_CT_BUNDLE, hint: str = "pass --weights FILE") -> Path:
    """The trained weights a bundle holds (``models/model.pt``). In a bundle shipped with ldct-clip they are
    checked against the sha256 its ``metadata.json`` gives under ``shipped_weights``; a user's own copy of a
    bundle (given as a folder elsewhere) holds whatever that user trained and is used as it is.

    Args:
        bundle: bundle folder or shipped bundle name.
        hint: what the user can do instead, for the error messages.

    Raises:
        WeightsError: no ``models/model.pt``, or one whose sha256 differs from the metadata's (a damaged
            copy, or a Git LFS pointer file instead of the weights).
    """
    root = resolve_bundle(bundle)
    path = root / SHIPPED_WEIGHTS
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    expected = (metadata.get("shipped_weights") or {}).get("sha256")
    if not path.is_file():
        shipped = "its weights are missing" if expected else "it ships no trained weights"
        raise WeightsError(f"bundle {root.name} has no {SHIPPED_WEIGHTS} ({shipped}): {hint}")
    shipped_with_ldct_clip = any(root.parent == p.resolve() for p in bundle_search_paths())
    if expected and shipped_with_ldct_clip:
        from ldct_clip.networks.clip_weights import sha256_of

        actual = sha256_of(path)
        if actual != expected.lower():
            raise WeightsError(
                f"{path} is not the weights bundle {root.name} ships (sha256 {actual[:12]}..., metadata.json "
                f"says {expected[:12]}...): the copy is damaged or a Git LFS pointer; reinstall ldct-clip, "
                f"or {hint}"
            )
    return path
