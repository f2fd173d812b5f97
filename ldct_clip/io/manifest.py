"""Manifests: what ldct-clip wrote, so that it replaces only its own, untouched outputs.

A folder output carries ``ldct-clip-manifest.json`` inside; a single-file output (a NIfTI, an image)
carries a sidecar ``<name>.ldct-clip.json`` beside it (for a NIfTI, also its provenance record). A
manifest lists every file with its size and sha256, the command, the provenance, the ldct-clip version
and the time. ``--overwrite`` replaces an existing output only when its manifest matches exactly what is
there (:func:`check_replaceable`); foreign files, edited files and outputs without manifest are refused.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import ldct_clip
from ldct_clip.errors import OutputError
from ldct_clip.io.provenance import Provenance, file_sha256

__all__ = [
    "MANIFEST_NAME",
    "REPLACED_PREFIX",
    "SIDECAR_SUFFIX",
    "STAGING_PREFIX",
    "audit_outputs",
    "check_replaceable",
    "default_command",
    "file_entry",
    "is_ldct_clip_output",
    "manifest_path",
    "manifest_problems",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "ldct-clip-manifest.json"
SIDECAR_SUFFIX = ".ldct-clip.json"
#: Names of what an unfinished write leaves: ``.ldct-clip-staging-<pid>-<token>-<final name>`` (the output
#: being written) and ``.ldct-clip-replaced-<pid>-<token>-<final name>`` (an old output moved aside).
STAGING_PREFIX = ".ldct-clip-staging-"
REPLACED_PREFIX = ".ldct-clip-replaced-"
FORMAT = "ldct-clip-manifest"
FORMAT_VERSION = 1
# How many offending files a refusal names before "and N more".
_NAMED = 3


def default_command() -> str:
    """This process's command line, as the user typed it where it is ``ldct-clip ...``."""
    argv = list(sys.argv)
    if argv and (
        Path(argv[0]).name == "ldct-clip" or argv[0].endswith(os.path.join("ldct_clip", "__main__.py"))
    ):
        argv[0] = "ldct-clip"
    return shlex.join(argv)


def manifest_path(output: str | os.PathLike, is_dir: bool | None = None) -> Path:
    """Where the manifest of ``output`` lives: inside a folder, beside a file.

    Args:
        output: the output folder or file.
        is_dir: whether ``output`` is a folder; ``None``: look at what is there (a missing path is a file).
    """
    output = Path(output)
    if is_dir is None:
        is_dir = output.is_dir() and not output.is_symlink()
    return output / MANIFEST_NAME if is_dir else output.with_name(output.name + SIDECAR_SUFFIX)


def file_entry(path: str | os.PathLike) -> dict:
    """A manifest's record of one file: its size and sha256."""
    return {"size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def _listing(folder: Path, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(files, links) under ``folder`` as sorted POSIX relative paths; links are not followed."""
    files, links = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                links.append((here / name).relative_to(folder).as_posix())
                dirnames.remove(name)
        for name in filenames:
            relative = (here / name).relative_to(folder).as_posix()
            if relative in exclude:
                continue
            (links if (here / name).is_symlink() else files).append(relative)
    return sorted(files), sorted(links)


def write_manifest(
    output: str | os.PathLike,
    *,
    is_dir: bool,
    provenance: Provenance | None = None,
    command: str = "",
    name: str | None = None,
    path: str | os.PathLike | None = None,
    previous: dict | None = None,
    exclude: tuple[str, ...] = (),
) -> Path:
    """Record what ``output`` holds now and write the manifest.

    Args:
        output: the folder or file just written (usually still under its staging name).
        is_dir: ``output`` is a folder (manifest inside) or a file (sidecar beside it).
        provenance: what made the output.
        command: the command line; default: this process's.
        name: the file's final name, recorded for a file staged under another name.
        path: where to write the manifest (default: :func:`manifest_path` of ``output``); written in place,
            so give a staging name and rename it where a reader must never see it half-written.
        previous: for a sidecar written while a file is being replaced: the entry of the file it replaces,
            so that the pair stays consistent whichever of the two files is in place.
        exclude: relative paths inside a folder not to record (e.g. the staging marker).

    Returns:
        the manifest's path.
    """
    output = Path(output)
    target = Path(path) if path is not None else manifest_path(output, is_dir)
    if is_dir:
        files, links = _listing(output, exclude=(MANIFEST_NAME, *exclude))
        if links:
            raise OutputError(
                f"{output} holds symbolic links ({links[0]}); ldct-clip writes plain files only"
            )
        entries = {relative: file_entry(output / relative) for relative in files}
    else:
        entries = {name or output.name: file_entry(output)}
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "folder" if is_dir else "file",
        "files": entries,
        "command": command or default_command(),
        "provenance": provenance.as_dict() if provenance is not None else None,
        "ldct_clip_version": ldct_clip.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if previous:
        record["previous"] = previous
    # Written in place: callers write manifests under a staging name and publish them with a rename.
    with open(target, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return target


def read_manifest(output: str | os.PathLike) -> dict | None:
    """The manifest of an output folder or file (or the manifest file itself); ``None`` if there is none.

    A file that is not valid JSON or not an ldct-clip manifest counts as none.
    """
    output = Path(output)
    if output.name == MANIFEST_NAME or output.name.endswith(SIDECAR_SUFFIX):
        target = output
    else:
        target = manifest_path(output)
    try:
        record = json.loads(target.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or not isinstance(record.get("files"), dict)
    ):
        return None
    return record


def is_ldct_clip_output(output: str | os.PathLike) -> bool:
    """True when ``output`` (folder or file) carries an ldct-clip manifest, whether or not it still matches."""
    return read_manifest(output) is not None


def _matches(path: Path, entry: dict) -> bool:
    try:
        return path.stat().st_size == entry.get("size") and file_sha256(path) == entry.get("sha256")
    except OSError:
        return False


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:_NAMED])
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def manifest_problems(output: str | os.PathLike) -> list[str]:
    """What differs between ``output`` and its manifest, one short phrase each; empty when they match.

    An empty folder has nothing to lose and no problem. A missing manifest is one problem.
    """
    output = Path(output)
    if output.is_symlink():
        return [f"{output} is a symbolic link, not an output ldct-clip wrote"]
    if output.is_dir():
        files, links = _listing(output, exclude=(MANIFEST_NAME,))
        if not files and not links:
            return []
        record = read_manifest(output)
        if record is None:
            what = (
                f"an unreadable {MANIFEST_NAME}"
                if (output / MANIFEST_NAME).exists()
                else f"no {MANIFEST_NAME}"
            )
            return [
                f"{len(files) + len(links)} files ldct-clip did not write ({_named(files + links)}): {what}"
            ]
        listed = record["files"]
        foreign = sorted((set(files) | set(links)) - set(listed))
        problems = []
        if foreign:
            problems.append(f"files ldct-clip did not write: {_named(foreign)}")
        missing = sorted(set(listed) - set(files))
        if missing:
            problems.append(f"files missing since ldct-clip wrote it: {_named(missing)}")
        changed = [f for f in files if f in listed and not _matches(output / f, listed[f])]
        if changed:
            problems.append(f"files changed since ldct-clip wrote them: {_named(changed)}")
        return problems
    if not output.exists():
        return []
    record = read_manifest(output)
    sidecar = manifest_path(output, is_dir=False)
    if record is None:
        return [f"not written by ldct-clip (no {sidecar.name} beside it)"]
    entries = [record["files"].get(output.name), (record.get("previous") or {}).get(output.name)]
    if not any(entry and _matches(output, entry) for entry in entries):
        return [f"changed since ldct-clip wrote it (size or sha256 differ from {sidecar.name})"]
    return []


def check_replaceable(output: str | os.PathLike, is_dir: bool | None = None) -> None:
    """Refuse to replace ``output`` unless ldct-clip wrote it and nothing has changed since.

    Args:
        output: an existing output folder or file. A missing one passes, unless a file output's sidecar
            name is taken by a file that is not an ldct-clip manifest.
        is_dir: whether the new output is a folder (``None``: judge by what is there).

    Raises:
        OutputError: one line naming what was found (foreign files, an edited file, no manifest).
    """
    output = Path(output)
    problems = manifest_problems(output)
    if problems:
        raise OutputError(
            f"will not replace {output}: {'; '.join(problems)}; ldct-clip replaces only its own unchanged "
            "outputs: move those files away or choose another output"
        )
    if not is_dir and not output.is_dir() and not output.exists():
        sidecar = manifest_path(output, is_dir=False)
        if sidecar.exists() and read_manifest(sidecar) is None:
            raise OutputError(
                f"will not replace {sidecar}: it is not an ldct-clip manifest; move it away or choose another output"
            )


def audit_outputs(root: str | os.PathLike) -> list[tuple[Path, list[str]]]:
    """Every ldct-clip output under ``root`` whose manifest no longer matches, with what differs.

    Staging leftovers (names starting with the staging prefixes) are not outputs and are not descended into.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((STAGING_PREFIX, REPLACED_PREFIX)))
        if MANIFEST_NAME in filenames:
            problems = manifest_problems(here)
            if problems:
                found.append((here, problems))
            dirnames[:] = []  # the folder's manifest covers everything under it
            continue
        for name in sorted(filenames):
            if name.endswith(SIDECAR_SUFFIX) and not name.startswith((STAGING_PREFIX, REPLACED_PREFIX)):
                output = here / name[: -len(SIDECAR_SUFFIX)]
                if read_manifest(here / name) is None:
                    continue
                problems = manifest_problems(output) if output.exists() else [f"{output.name} is missing"]
                if problems:
                    found.append((output, problems))
    return found
