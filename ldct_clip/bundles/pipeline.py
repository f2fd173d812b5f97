"""``BundlePipeline``: a bundle's config, parsed once through MONAI's bundle machinery, run item by item.

Every ldct-clip command that runs the model (``denoise`` for CT and images, ``evaluate``, ``benchmark``'s
model rows, ``demo``, ``robustness``, the PACS listener) goes through this class, so what runs is the
bundle's ``inference.json`` (with overlays such as ``evaluate.json``) and the command-line options are
config overrides, exactly as with ``python -m monai.bundle run``. What it adds to MONAI's
``ConfigWorkflow``: the evaluator's dataset can be given items per call (one series at a time, so that
one failing series of a ``--recursive`` run does not stop the others and the weights are read once), and
the errors a user can fix come out as one :class:`~ldct_clip.errors.LdctClipError` line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from monai.bundle import ConfigWorkflow

from ldct_clip.bundles.errors import user_error
from ldct_clip.bundles.locate import DEFAULT_CT_BUNDLE, TASKS, resolve_bundle
from ldct_clip.errors import InputError, LdctClipError

__all__ = ["BundlePipeline"]


class BundlePipeline:
    """A bundle config ready to run over items.

    Args:
        bundle: a bundle folder or the name of a bundle shipped with ldct-clip.
        configs: config files of the bundle's ``configs/`` folder, later ones overriding earlier ones
            (e.g. ``("inference.json", "evaluate.json")``).
        overrides: config ids and values to override (``{"ckpt_path": ..., "device": "cpu"}``), as
            ``python -m monai.bundle run --id value`` would. ``bundle_root`` is set to the bundle's folder.
        quiet: keep MONAI's INFO logging (per-run statistics) off the terminal.

    Example::

        pipeline = BundlePipeline("lowdose_ct_denoising", overrides={"device": "cpu", "jobs": []})
        pipeline.run([{"image": "ct_series/", "output": "denoised/"}])
    """

    def __init__(
        self,
        bundle: str | os.PathLike = DEFAULT_CT_BUNDLE,
        configs: Sequence[str] = ("inference.json",),
        overrides: Mapping[str, Any] | None = None,
        quiet: bool = True,
    ) -> None:
        self.root = resolve_bundle(bundle)
        files = [self.root / "configs" / name for name in configs]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"bundle {self.root.name} has no config {', '.join(missing)}; check --bundle")
        values = {"bundle_root": str(self.root), **dict(overrides or {})}
        with _quiet_monai(quiet):
            self.workflow = ConfigWorkflow(
                config_file=[str(f) for f in files],
                meta_file=str(self.root / "configs" / "metadata.json"),
                logging_file=False,
                workflow_type="infer",
                **values,
            )
        self.quiet = quiet
        self._initialized = False

    @property
    def metadata(self) -> dict:
        """The bundle's ``metadata.json`` (read once, with the configs)."""
        return dict(self.workflow.parser.get("_meta_", {}))

    @property
    def task(self) -> str:
        """``"ct"``, ``"srgb"`` or ``"synthetic"``: the metadata's ``denoising_task``."""
        task = str(self.metadata.get("denoising_task", ""))
        if task not in TASKS:
            raise InputError(
                f"bundle {self.root.name} does not say its task (metadata.json 'denoising_task' is {task!r}, "
                f"expected one of {', '.join(TASKS)}); fix its metadata"
            )
        return task

    def get(self, id: str) -> Any:
        """The parsed (instantiated) config item ``id``, created once and then reused."""
        self.initialize()
        with _user_errors():
            return self.workflow.parser.get_parsed_content(id)

    def initialize(self) -> None:
        """Parse the config and run its ``initialize`` section (once)."""
        if not self._initialized:
            with _user_errors(), _quiet_monai(self.quiet):
                self.workflow.initialize()
            self._initialized = True

    def run(self, items: Iterable[Mapping[str, Any]] | None = None) -> Any:
        """Run the evaluator once over ``items`` (or over the config's own dataset when None).

        Returns:
            the evaluator's last output (for one item: its ``{"image", "pred", ...}`` dict).
        """
        self.initialize()
        with _user_errors():
            if items is not None:
                self.get("dataset").data = [dict(item) for item in items]
            evaluator = self.get("evaluator")
            with _quiet_monai(self.quiet):
                evaluator.run()
        return evaluator.state.output

    def load_weights(self):
        """Read and load the trained weights now (the bundle's ``checkpoint_loader``), after every check of
        the inputs and outputs, rather than when the first item starts; returns the loader."""
        loader = self.get("checkpoint_loader")
        with _user_errors():
            loader.load()
        return loader

    def denoiser(self) -> EvaluatorDenoiser:
        """The pipeline as a function of a volume (or image) in memory: its evaluator run on that one item,
        with nothing written (the item has no ``output``). Run the pipeline with ``inplace`` False, so the
        input stays as it was for scoring."""
        return EvaluatorDenoiser(self)

    def finalize(self) -> None:
        """Run the config's ``finalize`` section, if it has one."""
        if self._initialized and "finalize" in self.workflow.parser:
            with _user_errors():
                self.workflow.finalize()


class EvaluatorDenoiser:
    """``denoise(volume) -> volume``: one run of a pipeline's evaluator over one in-memory item.

    A MetaTensor keeps its meta (the CT pipeline orients its slices by the affine); a plain tensor is taken
    as stored (slices already as the network sees them, e.g. Mayo npy slices).
    """

    def __init__(self, pipeline: BundlePipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, volume):
        return self.pipeline.run([{"image": volume}])["pred"]


class _user_errors:
    """Turn MONAI's wrapped config errors back into the user's one-line error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, LdctClipError):
            return False
        user = user_error(error)
        if user is not None:
            raise user from None
        return False


class _quiet_monai:
    """MONAI's engines and bundle workflow log INFO lines, a warning when no logging file is given, and
    ignite an "Engine run is terminating due to exception" line before every error it passes on; the
    command line prints its own one-line summary or error instead."""

    NAMES = (
        "monai.bundle",
        "monai.bundle.workflows",
        "ignite",
        "monai.engines",
        "StatsHandler",
        "CheckpointLoader",
    )

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.levels: dict[str, int] = {}

    def __enter__(self) -> None:
        if self.quiet:
            for name in self.NAMES:
                logger = logging.getLogger(name)
                self.levels[name] = logger.level
                logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc) -> bool:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        return False
