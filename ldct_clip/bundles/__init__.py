"""Where the MONAI bundles shipped with ldct-clip live, in a source checkout and in an installed wheel.

The bundles are kept at the top of the repository (``bundles/<name>``), where MONAI users expect them.
A wheel carries a copy inside this package (``ldct_clip/bundles/<name>``, put there by setup.py's
build step), so ``resolve_bundle`` looks next to this file first and then in the checkout.
"""

from __future__ import annotations

from pathlib import Path

from ldct_clip.errors import InputError

__all__ = ["DEFAULT_CT_BUNDLE", "available_bundles", "bundle_search_paths", "resolve_bundle"]

#: The bundle ``ldct-clip denoise`` runs unless ``--bundle`` says otherwise.
DEFAULT_CT_BUNDLE = "lowdose_ct_denoising"


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
