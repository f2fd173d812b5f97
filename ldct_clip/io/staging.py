"""Staged outputs: never touch the input, never leave half an output, never replace what is not ours.

Every output is first written under a staging name in its own folder
(``.ldct-clip-staging-<pid>-<token>-<name>``; a folder also holds a marker naming the process and the start
time), recorded in a manifest, and only then published with a rename on the same file system. A killed
run leaves the previous output complete plus a staging entry that is recognisably ours; the next run on
the same output removes it (only when its process is gone), :func:`find_leftovers` lists such entries and
the DICOM scanner never reads them. Errors of the storage (full, read-only, no permission, I/O) become one
line (:class:`~ldct_clip.errors.OutputError`) with the staged files removed.

``LDCT_CLIP_FAULT`` (see :func:`fault_point`) makes a run kill or interrupt itself, or fail with a storage
error, at a named step, so that tests can check all of the above on the real command.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ldct_clip.errors import OutputError
from ldct_clip.io.manifest import (
    MANIFEST_NAME,
    REPLACED_PREFIX,
    SIDECAR_SUFFIX,
    STAGING_PREFIX,
    check_replaceable,
    file_entry,
    manifest_path,
    read_manifest,
    write_manifest,
)
from ldct_clip.io.preflight import (
    REASONS,
    SPACE_MARGIN_BYTES,
    check_destination,
    check_output_path,
    megabytes,
)
from ldct_clip.io.provenance import Provenance

__all__ = [
    "FAULT_ENV",
    "MARKER_NAME",
    "check_output_path",
    "fault_point",
    "find_leftovers",
    "install_signal_handlers",
    "is_staging_name",
    "output_error",
    "remove_leftovers",
    "staged_output",
]

#: Marker inside a staging folder: who writes it (pid, host), since when, and for which output.
MARKER_NAME = ".ldct-clip-staging.json"
#: Environment variable of the fault injection hook, e.g. ``kill@slice-written#3``.
FAULT_ENV = "LDCT_CLIP_FAULT"
#: Storage errors turned into one-line OutputErrors.
TRANSLATED_ERRNOS = frozenset(REASONS)
_HINTS = {
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "choose an output on a writable file system",
    errno.EIO: "check the disk or network share and try again",
}
_LEFTOVER = re.compile(r"^\.ldct-clip-(staging|replaced)-(\d+)-([0-9a-f]{8})-(.+)$")
_FAULT_ERRNOS = {
    "enospc": errno.ENOSPC,
    "edquot": errno.EDQUOT,
    "eacces": errno.EACCES,
    "erofs": errno.EROFS,
    "eio": errno.EIO,
}
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}
_fault_hits: dict[str, int] = {}


# --- fault injection -------------------------------------------------------------------------------------


def fault_point(name: str) -> None:
    """A named step of writing; with ``LDCT_CLIP_FAULT`` set, the place where a fault is injected.

    ``LDCT_CLIP_FAULT`` holds comma-separated ``ACTION@POINT[#N]`` items: at the ``N``-th time (default 1)
    this process reaches ``POINT``, ``kill`` SIGKILLs the process, ``sigint`` / ``sigterm`` send it that
    signal, ``enospc`` / ``edquot`` / ``eacces`` / ``erofs`` / ``eio`` raise that ``OSError``. Points:
    ``output-checked``, ``staging-created``, ``slice-written`` (each DICOM slice), ``file-written`` (a NIfTI or
    image file), ``manifest-written``, ``before-publish``, ``old-moved-aside`` (a folder replacing an old
    one: old and new both still on disk), ``sidecar-published`` (a file replacing an old one), ``published``.
    Unset, a call costs one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if spec:
        _inject(spec, name)


def _inject(spec: str, name: str) -> None:
    hits = _fault_hits[name] = _fault_hits.get(name, 0) + 1
    for item in spec.split(","):
        action, _, where = item.strip().partition("@")
        point, _, nth = where.partition("#")
        if point != name or hits != int(nth or 1):
            continue
        action = action.lower()
        if action in _FAULT_SIGNALS:
            os.kill(os.getpid(), _FAULT_SIGNALS[action])  # a Python handler runs at the next bytecode
        elif action in _FAULT_ERRNOS:
            code = _FAULT_ERRNOS[action]
            raise OSError(code, os.strerror(code), f"{name} ({FAULT_ENV})")
        else:
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: unknown action {action!r}; use kill, sigint, sigterm, enospc..."
            )


def install_signal_handlers():
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread, so that staged files are removed as on Ctrl-C.

    Returns:
        the previous SIGTERM handler (``None`` when not called from the main thread, where nothing is changed).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    return signal.signal(signal.SIGTERM, _interrupt)


# --- errors ------------------------------------------------------------------------------------------------


def output_error(error: OSError, final: str | os.PathLike, needed_bytes: int | None = None) -> OutputError:
    """The one-line OutputError for a storage error met while writing ``final``.

    Args:
        error: the OSError (ENOSPC, EDQUOT, EACCES, EPERM, EROFS, EIO).
        final: the output being written.
        needed_bytes: the output's estimated size, to say how much space to free.
    """
    final = Path(final)
    reason = REASONS.get(error.errno, error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = 0
        with contextlib.suppress(OSError):
            folder = final.parent if final.parent.exists() else Path.cwd()
            free = shutil.disk_usage(folder).free
        need = (needed_bytes or 0) + SPACE_MARGIN_BYTES - free
        hint = (
            f"free {megabytes(need)} MB or choose another output"
            if needed_bytes
            else "free some space or choose another output"
        )
    else:
        hint = _HINTS.get(error.errno, "choose another output")
    return OutputError(f"cannot write {final}: {reason}; {hint}")


# --- output paths ------------------------------------------------------------------------------------------


def _check_existing(final: Path, overwrite: bool, is_dir: bool) -> None:
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputError(
                f"output {final} already exists; remove it, choose another path or pass --overwrite (Python: overwrite=True)"
            )
        if final.is_symlink():
            raise OutputError(f"will not replace {final}: it is a symbolic link; choose another output")
        if is_dir != final.is_dir():
            what, new = ("a folder", "file") if final.is_dir() else ("a file", "folder")
            raise OutputError(
                f"will not replace {final}: it is {what} and the output is a {new}; choose another output"
            )
    check_replaceable(final, is_dir=is_dir)


# --- leftovers of killed runs ------------------------------------------------------------------------------


def is_staging_name(name: str) -> bool:
    """True for the names of staging entries and of old outputs moved aside (what a killed run leaves)."""
    return name.startswith((STAGING_PREFIX, REPLACED_PREFIX))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: gone for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _marker(path: Path) -> dict | None:
    try:
        record = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _abandoned(path: Path) -> bool:
    """A staging entry whose process is gone (on this host) and that is recognisably ours."""
    match = _LEFTOVER.match(path.name)
    if match is None or _pid_alive(int(match.group(2))):
        return False
    if path.is_symlink():
        return False
    if path.is_dir():
        marker = _marker(path)
        if marker is not None:
            return marker.get("host") in (None, socket.gethostname())
        # Between the marker's removal and the publish, the manifest is there; right after mkdir, nothing.
        return (path / MANIFEST_NAME).is_file() or not any(path.iterdir())
    return True


def find_leftovers(root: str | os.PathLike) -> list[Path]:
    """Staging folders/files and old outputs moved aside by killed runs under ``root`` (whose process is gone)."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(filenames):
            if is_staging_name(name) and _abandoned(here / name):
                found.append(here / name)
        for name in sorted(dirnames):
            if is_staging_name(name) and _abandoned(here / name):
                found.append(here / name)
        dirnames[:] = sorted(d for d in dirnames if not is_staging_name(d))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_leftovers(final: str | os.PathLike) -> list[Path]:
    """Clean up after killed runs that wrote ``final``: remove their staging entries, and put an old output
    moved aside back in place where the new one never arrived.

    Only entries named for ``final`` (or its sidecar) whose process is gone are touched.

    Returns:
        the entries removed or restored.
    """
    final = Path(final).expanduser().absolute()
    names = {final.name, final.name + SIDECAR_SUFFIX}
    if not final.parent.is_dir():
        return []
    touched = []
    for entry in sorted(final.parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or match.group(4) not in names or not _abandoned(entry):
            continue
        target = final.parent / match.group(4)
        if match.group(1) == "replaced" and not (target.exists() or target.is_symlink()):
            os.replace(entry, target)  # the run died between moving the old output aside and publishing
        else:
            _remove(entry)
        touched.append(entry)
    return touched


# --- publishing --------------------------------------------------------------------------------------------


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    ``os.replace`` cannot put a folder over a non-empty one; the exchange lets a new folder output take the
    old one's place with no moment where neither is there.
    """
    function = _renameat2()
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _write_marker(staging: Path, final: Path) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "final": str(final),
    }
    (staging / MARKER_NAME).write_text(json.dumps(record))


def _publish_folder(staging: Path, final: Path, aside: Path) -> None:
    if not (final.exists() or final.is_symlink()):
        os.replace(staging, final)
        return
    if _exchange(staging, final):
        fault_point("old-moved-aside")  # the new output is in place, the old one under the staging name
        _remove(staging)
        return
    os.replace(final, aside)
    try:
        fault_point("old-moved-aside")
        os.replace(staging, final)
    except BaseException:
        os.replace(aside, final)
        raise
    _remove(aside)


@contextlib.contextmanager
def staged_output(
    final: str | os.PathLike,
    *,
    overwrite: bool = False,
    is_dir: bool = False,
    provenance: Provenance | None = None,
    command: str = "",
    needed_bytes: int | None = None,
    manifest: bool = True,
) -> Iterator[Path]:
    """Yield a staging path to write into; publish it as ``final`` with its manifest only if the block succeeds.

    The staging name ends with the final name, so writers that pick a format by suffix (nibabel: ``.nii.gz``)
    behave as for the final path. A folder output gets ``ldct-clip-manifest.json`` inside, a file output a
    sidecar ``<name>.ldct-clip.json``; the file and its sidecar are published so that a crash at any moment
    leaves a consistent pair (old or new).

    Args:
        final: the output file or folder.
        overwrite: allow replacing an existing ``final``, which must then be an unchanged ldct-clip output
            (:func:`~ldct_clip.io.manifest.check_replaceable`); without it, an existing ``final`` is refused.
        is_dir: the output is a folder (the staging folder is created here) rather than a file (the writer
            creates the staging file).
        provenance: recorded in the manifest.
        command: recorded in the manifest (default: this process's command line).
        needed_bytes: the output's estimated size: checked against the free space before anything is
            written, and named in the message if the disk fills up anyway.
        manifest: write the manifest (False for a file that goes into a folder which gets its own).

    Raises:
        OutputError: an existing output that may not be replaced, or a storage error (full, read-only, no
            permission, I/O), with the staged files removed. Any other exception (``KeyboardInterrupt``
            included) is raised as it is, also with the staged files removed.
    """
    final = Path(final).expanduser().absolute()
    token = secrets.token_hex(4)
    staging = final.parent / f"{STAGING_PREFIX}{os.getpid()}-{token}-{final.name}"
    staged_sidecar = staging.with_name(staging.name + SIDECAR_SUFFIX)
    sidecar = manifest_path(final, is_dir=False)
    undo = None  # puts back the old sidecar while a file output is half published
    try:
        remove_leftovers(final)
        _check_existing(final, overwrite, is_dir)
        if needed_bytes is not None:
            check_destination(final, needed_bytes)
        fault_point("output-checked")
        final.parent.mkdir(parents=True, exist_ok=True)  # only once every check has passed
        if is_dir:
            staging.mkdir()
            _write_marker(staging, final)
        fault_point("staging-created")
        yield staging
        if not staging.exists():
            raise OutputError(f"nothing was written to {final}")
        if is_dir:
            if manifest:
                write_manifest(
                    staging, is_dir=True, provenance=provenance, command=command, exclude=(MARKER_NAME,)
                )
                fault_point("manifest-written")
            (staging / MARKER_NAME).unlink()
            fault_point("before-publish")
            _publish_folder(
                staging, final, final.parent / f"{REPLACED_PREFIX}{os.getpid()}-{token}-{final.name}"
            )
        else:
            previous = {final.name: file_entry(final)} if final.is_file() else None
            if manifest:
                write_manifest(
                    staging,
                    is_dir=False,
                    provenance=provenance,
                    command=command,
                    name=final.name,
                    path=staged_sidecar,
                    previous=previous,
                )
                fault_point("manifest-written")
            fault_point("before-publish")
            old_sidecar = sidecar.read_bytes() if sidecar.is_file() else None
            if manifest:
                # The sidecar goes first and lists both the old and the new file: whichever is in place, the
                # pair is consistent; then the file; then the sidecar without the old entry.
                os.replace(staged_sidecar, sidecar)
                undo = functools.partial(_restore_sidecar, sidecar, staged_sidecar, old_sidecar)
                fault_point("sidecar-published")
            os.replace(staging, final)
            undo = None
            if manifest and previous:
                record = read_manifest(sidecar) or {}
                record.pop("previous", None)
                staged_sidecar.write_text(json.dumps(record, indent=1, sort_keys=True))
                os.replace(staged_sidecar, sidecar)
            elif not manifest and old_sidecar is not None:
                sidecar.unlink()  # it described the file just replaced
        fault_point("published")
    except BaseException as error:
        if undo is not None:
            with contextlib.suppress(OSError):
                undo()
        for path in (staging, staged_sidecar):
            with contextlib.suppress(OSError):
                _remove(path)
        if (
            isinstance(error, OSError)
            and not isinstance(error, OutputError)
            and error.errno in TRANSLATED_ERRNOS
        ):
            raise output_error(error, final, needed_bytes) from error
        raise


def _restore_sidecar(sidecar: Path, staged: Path, old: bytes | None) -> None:
    if old is None:
        sidecar.unlink(missing_ok=True)
        return
    staged.write_bytes(old)
    os.replace(staged, sidecar)
