"""Fail before computing: is the input readable, the destination writable, the disk big enough?

Each check costs milliseconds and raises one line a user can act on, so that a run that cannot finish
stops before the model is loaded, not after every slice has been computed.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import shutil
from pathlib import Path

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.manifest import STAGING_PREFIX, check_replaceable

__all__ = [
    "SPACE_MARGIN_BYTES",
    "check_destination",
    "check_output",
    "check_output_path",
    "check_readable",
    "dicom_series_bytes",
    "megabytes",
    "nearest_existing_parent",
    "nifti_bytes",
]

#: Free space kept beyond an output's estimated size (file system metadata, logs, other writers).
SPACE_MARGIN_BYTES = 32 * 2**20
# Upper bound of one derived slice's header (Part-10 preamble, file meta, copied source tags, provenance).
_DICOM_HEADER_BYTES = 16 * 2**10
# Manifest / sidecar: about 150 bytes per file plus the command and provenance.
_MANIFEST_BASE_BYTES = 16 * 2**10
_MANIFEST_ENTRY_BYTES = 256
_NIFTI_HEADER_BYTES = 352  # NIfTI-1 header + extension flag; the data follow at vox_offset 352

#: What an OSError's errno means, in the words of the one-line messages.
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
}


def megabytes(n_bytes: float) -> int:
    """Whole megabytes (MiB), rounded up, at least 1."""
    return max(1, math.ceil(n_bytes / 2**20))


def dicom_series_bytes(n_slices: int, rows: int, columns: int) -> int:
    """Upper bound of a derived DICOM series on disk: int16 pixels, a generous header per slice, the manifest."""
    per_slice = rows * columns * 2 + _DICOM_HEADER_BYTES
    return n_slices * (per_slice + _MANIFEST_ENTRY_BYTES) + _MANIFEST_BASE_BYTES


def nifti_bytes(shape) -> int:
    """Upper bound of an int16 NIfTI (uncompressed, which a .nii.gz never exceeds by much) with its sidecar."""
    voxels = math.prod(int(s) for s in shape)
    # gzip of incompressible data adds ~0.03 %: one part in 1000 covers it.
    return voxels * 2 + voxels * 2 // 1000 + _NIFTI_HEADER_BYTES + _MANIFEST_BASE_BYTES


def nearest_existing_parent(path: str | os.PathLike) -> Path:
    """The closest folder above ``path`` (or ``path``'s own parent) that exists."""
    candidate = Path(path).expanduser().absolute().parent
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def _probe_writable(folder: Path, target: Path) -> None:
    """Create and delete a file in ``folder``: the only test that is right for root, ACLs and read-only mounts."""
    probe = folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        reason = REASONS.get(e.errno, e.strerror or str(e))
        hint = (
            "choose a folder you can write to"
            if e.errno in (errno.EACCES, errno.EPERM)
            else "choose another output"
        )
        raise OutputError(f"cannot write {target}: {reason} in {folder}; {hint}") from e
    os.close(fd)
    probe.unlink()


def check_destination(path: str | os.PathLike, needed_bytes: int) -> None:
    """Check that ``path`` can be written with ``needed_bytes`` of data before any work is done.

    The nearest existing folder above ``path`` must accept a new file (a probe file is created and
    deleted: as root, ``os.access`` says yes even on a read-only mount) and its file system must have
    ``needed_bytes`` plus a margin (:data:`SPACE_MARGIN_BYTES`) free.

    Args:
        path: the output file or folder about to be written (it need not exist, nor its parents).
        needed_bytes: estimate of the output's size (:func:`dicom_series_bytes`, :func:`nifti_bytes`).

    Raises:
        OutputError: one line: not writable (and why), or how many MB are missing.
    """
    target = Path(path).expanduser().absolute()
    folder = nearest_existing_parent(target)
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is a file, not a folder; choose another output")
    _probe_writable(folder, target)
    free = shutil.disk_usage(folder).free
    needed = int(needed_bytes) + SPACE_MARGIN_BYTES
    if free < needed:
        raise OutputError(
            f"cannot write {target}: only {free // 2**20} MB free on the device of {folder}, it needs "
            f"{megabytes(needed)} MB (about {megabytes(needed_bytes)} MB of output and "
            f"{SPACE_MARGIN_BYTES // 2**20} MB to spare); free {megabytes(needed - free)} MB or choose another output"
        )


def check_readable(path: str | os.PathLike) -> None:
    """Check that the input ``path`` exists and can be read (a folder: listed; a file: opened).

    Raises:
        InputError: missing, a broken symbolic link, or not readable (with the reason).
    """
    path = Path(path).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{path} is a broken symbolic link (to {os.readlink(path)}); fix the link")
        raise InputError(f"{path} does not exist; check the path")
    try:
        if path.is_dir():
            with os.scandir(path) as entries:
                next(entries, None)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        reason = REASONS.get(e.errno, e.strerror or str(e))
        raise InputError(f"cannot read {path}: {reason}; check its permissions") from e


def _is_relative_to(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
    except ValueError:
        return False
    return True


def check_output_path(
    input_path: str | os.PathLike | None, output_path: str | os.PathLike, overwrite: bool
) -> Path:
    """Refuse an output location that would endanger the input or silently replace data.

    Args:
        input_path: file or folder the data was read from (``None`` when there is none, e.g. a phantom).
        output_path: file or folder about to be written.
        overwrite: whether an existing output may be replaced (whether it may is decided by
            :func:`check_output` or, at the latest, when it is written).

    Returns:
        the resolved output path.

    Raises:
        OutputError: the output equals the input, lies inside it, contains it, or exists without ``overwrite``.
    """
    out = Path(output_path).expanduser().resolve()
    if input_path is not None:
        src = Path(input_path).expanduser().resolve()
        if out == src:
            raise OutputError(f"output {out} is the input itself; choose another output path")
        if src.is_dir() and _is_relative_to(out, src):
            raise OutputError(f"output {out} lies inside the input folder {src}; choose a path outside it")
        if _is_relative_to(src, out):
            raise OutputError(
                f"output {out} contains the input {src}; choose a path that does not contain the input"
            )
    if out.exists() and not overwrite:
        raise OutputError(
            f"output {out} already exists; remove it, choose another path or pass --overwrite (Python: overwrite=True)"
        )
    return out


def check_output(
    input_path: str | os.PathLike | None,
    output_path: str | os.PathLike,
    overwrite: bool,
    needed_bytes: int | None = None,
    is_dir: bool | None = None,
) -> Path:
    """Everything about one output that can be known before it is computed, in one call.

    :func:`check_output_path` (not the input, not inside or around it, not existing without ``overwrite``),
    :func:`~ldct_clip.io.manifest.check_replaceable` (an existing output is replaced only if it is an
    unchanged ldct-clip output) and, given ``needed_bytes``, :func:`check_destination` (writable, enough
    free space).

    Args:
        input_path: the input file or folder (``None`` when there is none).
        output_path: the output file or folder.
        overwrite: whether an existing output may be replaced.
        needed_bytes: the output's estimated size (:func:`dicom_series_bytes`, :func:`nifti_bytes`).
        is_dir: whether the output is a folder (``None``: judge by what is there).

    Returns:
        the resolved output path.

    Raises:
        OutputError: one line saying what stands in the way.
    """
    out = check_output_path(input_path, output_path, overwrite)
    check_replaceable(out, is_dir=is_dir)
    if needed_bytes is not None:
        check_destination(out, needed_bytes)
    return out
