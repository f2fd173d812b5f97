"""One clear line for a failed bundle run, on every route.

MONAI's config parser wraps what our code raises ("Failed to instantiate ...", "Failed to evaluate ...")
in several layers, so a user of ``python -m monai.bundle run`` got a 70-line traceback with the real
message in its middle. The bundles' configs call :func:`install` first in their ``initialize`` section,
which makes :func:`excepthook` the interpreter's: an error a user can fix (:class:`~ldct_clip.errors.LdctClipError`
anywhere in the chain) is printed as that one line alone; any other failure keeps its traceback and gets
its root cause restated as the last line. ``ldct-clip`` commands unwrap the same way (:func:`user_error`).
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

from ldct_clip.errors import LdctClipError

__all__ = ["excepthook", "install", "root_cause", "user_error"]


def _chain(error: BaseException | None):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def user_error(error: BaseException) -> LdctClipError | None:
    """The :class:`LdctClipError` behind ``error`` (itself or a cause in its chain), or None."""
    return next((e for e in _chain(error) if isinstance(e, LdctClipError)), None)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain: what actually went wrong."""
    return list(_chain(error))[-1]


def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` for bundle runs: one line for a user error, else the traceback + root cause last."""
    user = user_error(error)
    if user is not None:
        print(f"error: {user}", file=sys.stderr)
        return
    traceback.print_exception(kind, error, tb)
    if not isinstance(error, KeyboardInterrupt):
        root = root_cause(error)
        print(f"error: {type(root).__name__}: {root}", file=sys.stderr)


def install() -> None:
    """Make :func:`excepthook` the interpreter's (only where nobody else replaced the default)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = excepthook
