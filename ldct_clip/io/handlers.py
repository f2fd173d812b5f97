"""Ignite handlers over the staged outputs: a folder that an evaluator run fills, published only if it completes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from ignite.engine import Engine, Events

from ldct_clip.io.staging import staged_output

__all__ = ["StagedFolder"]


class StagedFolder:
    """An output folder filled during one evaluator run (e.g. a folder of denoised images): the writers write
    into its staging path; it is published with one manifest when the run completes, and removed when the run
    fails or is interrupted, so that the folder holds all the outputs or none.

    Args:
        folder: the output folder, or None for a run without one (nothing staged; writers use their own
            files).
        overwrite: allow replacing an existing folder ldct-clip wrote (see :func:`~ldct_clip.io.staged_output`).
        provenance: what made the outputs (or a callable giving it once the weights are loaded), recorded in
            the manifest.
    """

    def __init__(
        self,
        folder: str | os.PathLike | None,
        overwrite: bool = False,
        provenance: Callable[[], object] | object | None = None,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.overwrite = overwrite
        self.provenance = provenance
        self._stack: contextlib.ExitStack | None = None
        self.path: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.COMPLETED, self.publish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.discard)

    def open(self, engine: Engine | None = None) -> None:
        if self.folder is None or self._stack is not None:
            return
        provenance = self.provenance() if callable(self.provenance) else self.provenance
        self._stack = contextlib.ExitStack()
        self.path = self._stack.enter_context(
            staged_output(self.folder, overwrite=self.overwrite, is_dir=True, provenance=provenance)
        )

    def target(self, final: str | os.PathLike) -> Path:
        """Where the writer writes ``final``: inside the staging folder while staged, else ``final`` itself."""
        return self.path / Path(final).name if self.path is not None else Path(final)

    def publish(self, engine: Engine | None = None) -> None:
        stack, self._stack, self.path = self._stack, None, None
        if stack is not None:
            stack.close()

    def discard(self, engine: Engine, error: BaseException) -> None:
        stack, self._stack, self.path = self._stack, None, None
        if stack is not None:
            stack.__exit__(type(error), error, error.__traceback__)
        raise error
