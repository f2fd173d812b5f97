"""Event handlers of the training engine: gradient clipping, learning-rate logging, the whole-run progress
bar, the data stream's position, the "latest"/"best" checkpoints and the final model file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from torch import nn
from tqdm.auto import tqdm

from ldct_clip.data.stream import StreamSampler
from ldct_clip.networks import save_checkpoint
from ldct_clip.training.distributed import is_main_process

__all__ = [
    "FinalModelSaver",
    "GradientClipHandler",
    "LearningRateRecorder",
    "StreamPositionHandler",
    "TrainingCheckpointer",
    "TrainingProgressBar",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients (the decoder and the 1->3 conv; never the frozen CLIP encoder)."""
    return [p for p in module.parameters() if p.requires_grad]


class GradientClipHandler:
    """Clips the gradient norm of the trainable parameters after every backward pass, before the step.

    ``SupervisedTrainer`` has no clipping argument; it fires ``IterationEvents.BACKWARD_COMPLETED`` between
    ``backward()`` and ``optimizer.step()``, which is where this runs. Under AMP the gradients are
    unscaled first, so the threshold is in true gradient units (as without AMP).

    Args:
        max_norm: the norm threshold (the paper: 0.01).
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float = 0.01, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(trainable_parameters(engine.network), self.max_norm, self.norm_type)


class LearningRateRecorder:
    """Puts the current learning rate into ``engine.state.metrics["lr"]`` at each round's end, so
    ``StatsHandler`` and ``TensorBoardStatsHandler`` log it with the other metrics.

    Args:
        optimizer: the optimizer whose first parameter group's LR is logged.
        name: metric name.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "lr") -> None:
        self.optimizer = optimizer
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = float(self.optimizer.param_groups[0]["lr"])


class TrainingProgressBar:
    """One tqdm bar over the whole run's iterations, with the running loss and the time left.

    ignite's ``ProgressBar`` restarts at every epoch, and our epochs are only checkpoint rounds
    (``ldct_clip.training.round_length``); a user wants the position in the whole run and its remaining
    time, also after ``--resume`` (the bar starts at the restored iteration). Attach it after the resume
    handlers.

    Args:
        output_transform: engine output -> loss (a float or a 0-d tensor).
        desc: the bar's label.
        disable: no bar (e.g. for logs that go to a file).
        mininterval: seconds between redraws, which keeps log files small on fast GPUs.
        file: stream to draw on; default stderr.
    """

    def __init__(
        self,
        output_transform: Callable = lambda output: output["loss"],
        desc: str = "training",
        disable: bool = False,
        mininterval: float = 1.0,
        file=None,
    ) -> None:
        self.output_transform = output_transform
        self.desc = desc
        self.disable = bool(disable)
        self.mininterval = float(mininterval)
        self.file = file
        self.bar = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._advance)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.TERMINATE, self._close)

    def _open(self, engine: Engine) -> None:
        total = int(engine.state.max_epochs) * int(engine.state.epoch_length)
        self.bar = tqdm(
            total=total,
            initial=int(engine.state.iteration),
            desc=self.desc,
            unit="it",
            dynamic_ncols=True,
            mininterval=self.mininterval,
            disable=self.disable,
            file=self.file,
        )

    def _advance(self, engine: Engine) -> None:
        if self.bar is None or self.disable:
            return
        self.bar.update(1)
        # read the loss only when the bar has just redrawn (at most once per mininterval): reading a CUDA
        # tensor synchronises the GPU, which every iteration would slow training down
        if self.bar.last_print_n == self.bar.n:
            loss = self.output_transform(engine.state.output)
            loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def _close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StreamPositionHandler:
    """Starts the data stream where the trainer is: at 0 for a new run, at the restored iteration after
    ``CheckpointLoader``. Runs at ``EPOCH_STARTED`` (after every ``STARTED`` handler, and before ignite
    creates the data iterator).

    Args:
        sampler: the training loader's sampler.
    """

    def __init__(self, sampler: StreamSampler) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.start_iteration = int(engine.state.iteration)


class TrainingCheckpointer:
    """The "latest" and "best" checkpoints of a training run, each with the full resume state.

    Two MONAI ``CheckpointSaver``: one every round (``checkpoint_epoch=N.pt``, the last ``n_saved`` kept),
    one when the validation key metric improves (``best.pt``). Both save ``save_dict`` plus the trainer
    itself (iteration, epoch), which is added here at ``attach`` time because the trainer config cannot
    refer to itself. At each round's end the evaluator's metrics (when it ran this round) are copied into
    the trainer's ``state.metrics``, so the "best" saver and the logging handlers see them.

    Runs on every rank: ignite's ``Checkpoint`` makes collective calls and only rank 0 writes.

    Args:
        save_dir: output folder.
        save_dict: objects to save (model, optimizer, scheduler, ``TrainingState``...).
        evaluator: the validation evaluator (None: no "best" checkpoint).
        key_metric: evaluator metric deciding "best" (greater is better).
        n_saved: number of "latest" checkpoints kept.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        evaluator: Engine | None = None,
        key_metric: str = "val_psnr",
        n_saved: int = 1,
    ) -> None:
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.n_saved = int(n_saved)
        self.latest = self.best = None

    def attach(self, engine: Engine) -> None:
        save_dict = {**self.save_dict, "trainer": engine}
        self.latest = CheckpointSaver(
            self.save_dir, save_dict, save_interval=1, n_saved=self.n_saved, epoch_level=True
        )
        if self.evaluator is not None:
            self.best = CheckpointSaver(
                self.save_dir,
                save_dict,
                save_key_metric=True,
                key_metric_name=self.key_metric,
                key_metric_filename="best.pt",
            )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        evaluator = self.evaluator
        if (
            evaluator is not None
            and evaluator.state.epoch == engine.state.epoch
            and self.key_metric in evaluator.state.metrics
        ):
            metrics = [dict(evaluator.state.metrics)]
            if dist.is_available() and dist.is_initialized():
                # every rank must take the same save decision (saving gathers RNG states from all ranks):
                # use rank 0's numbers, in case a GPU's non-deterministic kernels made them differ
                dist.broadcast_object_list(metrics, src=0)
            engine.state.metrics.update(metrics[0])
            self.best.metrics_completed(engine)
        self.latest.interval_completed(engine)


class FinalModelSaver:
    """Writes the trained network with ``ldct_clip.networks.save_checkpoint`` when training completes
    (rank 0 only), so ``ldct-clip denoise``/``evaluate`` and the inference bundle load it directly.

    Args:
        network: the (possibly DDP-wrapped) network.
        path: output file, e.g. ``models/model.pt``.
        extra: extra entries for the checkpoint (e.g. the training recipe).
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
        self.network = network
        self.path = path
        self.extra = extra

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        extra = {"iteration": int(engine.state.iteration), **(self.extra or {})}
        save_checkpoint(self.path, getattr(self.network, "module", self.network), extra=extra)
        logger.info("saved the trained network to %s", self.path)
