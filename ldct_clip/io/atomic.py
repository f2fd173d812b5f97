"""Safe output: never touch the input, never leave half an output behind.

Everything is first written to a hidden sibling of the final path (same folder, so the final
``os.replace`` is a rename on one file system) and only renamed into place once complete. An
interrupted write therefore leaves either no output or the complete previous one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ldct_clip.errors import OutputError

__all__ = ["atomic_output", "check_output_path"]


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
        overwrite: whether an existing output may be replaced.

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
            f"output {out} already exists; remove it, choose another path or pass overwrite=True"
        )
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write into; move it to ``path`` only if the block succeeds.

    The temporary name keeps the final name as its suffix so that writers choosing a format by
    extension (nibabel: ``.nii.gz``) behave as for the final path.

    Args:
        path: the final file or folder.
        overwrite: replace an existing ``path``; otherwise an existing one raises :class:`OutputError`.
        is_dir: create the temporary path as an empty folder (for a DICOM series) instead of
            leaving it to the writer to create a file.
    """
    final = Path(path).expanduser().absolute()
    if final.exists() and not overwrite:
        raise OutputError(
            f"output {final} already exists; remove it, choose another path or pass overwrite=True"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = final.parent / f".partial-{token}-{final.name}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"nothing was written to {final}")
        if final.exists():
            # Keep the old output until the new one is in place: a crash between the two renames leaves
            # the old one under a hidden name rather than losing both.
            old = final.parent / f".replaced-{token}-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
