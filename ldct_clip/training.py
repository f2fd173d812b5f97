"""What the MONAI/ignite training engines need beyond MONAI: mixup, resume state, gradient clipping,
learning-rate logging, padded validation, seeding and the distributed set-up.

Iteration-based training. ``SupervisedTrainer`` runs ``iterations / epoch_length`` "epochs" of
``epoch_length`` iterations over an endless, seeded data stream (``ldct_clip.data.datasets.StreamSampler``):
an epoch is only a round between checkpoints, logs and validations (1000 iterations by default, see
:func:`round_length`). Checkpoints are written at round ends and hold everything a resumed run needs to
continue as if never stopped (bit for bit on a CPU; on GPUs up to their non-deterministic kernels):
model, optimizer, LR scheduler, trainer (iteration, epoch), the RNG states of python/numpy/torch/cuda of
every rank (:class:`TrainingState`); the data stream's position is the trainer's iteration
(:class:`StreamPositionHandler`). A resumed run does not know the best score of the run before it: its
first validation writes ``best.pt`` again.

Multi-GPU: ``torchrun`` sets the environment, :func:`init_distributed` starts the process group (NCCL on
GPUs, gloo on CPUs) and puts every rank at a barrier before the engines are built, so no rank enters
ignite's collective calls (inside ``CheckpointSaver``) ahead of the others: the known MONAI/ignite hang.
Handlers with collectives or state (checkpointing, validation, LR schedule, clipping) run on every rank;
only the logging handlers are rank 0's. Validation runs in full on every rank, so every rank sees the same
key metric and the "best" checkpoint decision agrees.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.inferers import Inferer
from torch import nn

from ldct_clip.errors import InputError

__all__ = [
    "GradientClipHandler",
    "LearningRateRecorder",
    "Mixup",
    "NetworkConfig",
    "PaddedInferer",
    "StreamPositionHandler",
    "TrainingState",
    "FinalModelSaver",
    "ResumeFromCheckpoint",
    "TrainingCheckpointer",
    "TrainingProgressBar",
    "resume_handlers",
    "cleanup_distributed",
    "cosine_scheduler",
    "init_distributed",
    "is_main_process",
    "main_process_only",
    "recalibrate_encoder_bn",
    "round_length",
    "seed_everything",
    "trainable_parameters",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


def round_length(iterations: int, preferred: int = 1000) -> int:
    """The largest divisor of ``iterations`` not above ``preferred``: iterations per round (ignite epoch).

    Raises:
        InputError: ``iterations`` or ``preferred`` not positive.
    """
    iterations, preferred = int(iterations), int(preferred)
    if iterations < 1 or preferred < 1:
        raise InputError(f"iterations ({iterations}) and the round length ({preferred}) must be positive")
    return max(d for d in range(1, min(iterations, preferred) + 1) if iterations % d == 0)


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seeds python, numpy and torch (all devices) with ``seed + rank`` and returns that seed.

    Each rank gets its own stream (feature augmentation and mixup draws differ between ranks, as with
    independent GPUs); the data stream is seeded separately and does not depend on it.
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients (the decoder and the 1->3 conv; never the frozen CLIP encoder)."""
    return [p for p in module.parameters() if p.requires_grad]


class Mixup:
    """Batch-level mixup of the reference (``Mixing_Augment`` with ``use_identity: true``), as a
    ``prepare_batch`` for MONAI's ``SupervisedTrainer``.

    With probability ``prob`` the batch is mixed with a random permutation of itself,
    ``x <- lam * x + (1 - lam) * x[perm]``, with the same ``lam ~ Beta(beta, beta)`` and the same
    permutation for the noisy input and the clean target; otherwise it passes unchanged. Draws come from
    torch's global generator (its state is part of :class:`TrainingState`).

    Args:
        prob: probability that a batch is mixed (the reference: 0.5, a coin between mixup and identity).
        beta: parameter of the symmetric Beta distribution of ``lam`` (1.2).
        prepare_batch: how the batch becomes (input, target) on the device first.
    """

    def __init__(
        self, prob: float = 0.5, beta: float = 1.2, prepare_batch: Callable = default_prepare_batch
    ) -> None:
        if not 0 <= prob <= 1:
            raise InputError(f"mixup probability {prob} must be in [0, 1]")
        self.prob = float(prob)
        self.beta = float(beta)
        self.prepare_batch = prepare_batch

    def mix(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob == 0 or torch.rand(()).item() >= self.prob:
            return image, label
        lam = torch.distributions.Beta(torch.tensor(self.beta), torch.tensor(self.beta)).sample().item()
        perm = torch.randperm(image.shape[0]).to(image.device)
        return lam * image + (1 - lam) * image[perm], lam * label + (1 - lam) * label[perm]

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        return self.mix(image, label)


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


def cosine_scheduler(
    optimizer: torch.optim.Optimizer, iterations: int, eta_min: float = 1e-6
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Cosine annealing over ``iterations`` steps to ``eta_min``; step it every iteration
    (``monai.handlers.LrScheduleHandler(epoch_level=False)``)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=int(iterations), eta_min=float(eta_min)
    )


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
    (:func:`round_length`); a user wants the position in the whole run and its remaining time, also after
    ``--resume`` (the bar starts at the restored iteration). Attach it after the resume handlers.

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
        from tqdm.auto import tqdm

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
        sampler: the training loader's :class:`~ldct_clip.data.datasets.StreamSampler`.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.start_iteration = int(engine.state.iteration)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # weights_only loading accepts tensors, not numpy arrays
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """The random-number state of a run, as an object with ``state_dict``/``load_state_dict`` for
    ``CheckpointSaver``/``CheckpointLoader``: python, numpy, torch and cuda generators of every rank.

    In a distributed run ``state_dict`` gathers every rank's state (a collective call: ``CheckpointSaver``
    must run on every rank, which is how ignite expects it) and ``load_state_dict`` gives each rank its
    own; a checkpoint from a different world size restores rank ``r mod n``'s state.
    """

    def state_dict(self) -> dict:
        state = _rng_state()
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)
            return {"ranks": gathered}
        return {"ranks": [state]}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        _set_rng_state(ranks[rank % len(ranks)])


class NetworkConfig:
    """Stores the network's constructor arguments in checkpoints (key ``"network"``), so a checkpoint of
    ``CheckpointSaver`` rebuilds its network with ``ldct_clip.networks.load_model`` like one of
    ``save_checkpoint``. Loading it back is a no-op: the network is built from the bundle config.

    Args:
        network: the (possibly DDP-wrapped) network with a ``config`` dict.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = getattr(network, "module", network)

    def state_dict(self) -> dict:
        return dict(getattr(self.network, "config", {}))

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the architecture comes from the configuration."""


class PaddedInferer(Inferer):
    """Reflect-pads (B, C, H, W) batches at the bottom/right to a multiple of ``multiple`` before the
    network and crops back, as the reference validation and evaluation do (``window_size: 32``).

    Args:
        multiple: the multiple (32 as in the reference).
    """

    def __init__(self, multiple: int = 32) -> None:
        super().__init__()
        self.multiple = int(multiple)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        from ldct_clip.networks import pad_to_multiple

        height, width = inputs.shape[-2:]
        return network(pad_to_multiple(inputs, self.multiple), *args, **kwargs)[..., :height, :width]


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
        from ldct_clip.networks import save_checkpoint

        extra = {"iteration": int(engine.state.iteration), **(self.extra or {})}
        save_checkpoint(self.path, getattr(self.network, "module", self.network), extra=extra)
        logger.info("saved the trained network to %s", self.path)


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
        save_dict: objects to save (model, optimizer, scheduler, :class:`TrainingState`...).
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
        from monai.handlers import CheckpointSaver

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


class ResumeFromCheckpoint:
    """Restores a run from a :class:`TrainingCheckpointer` checkpoint when the trainer starts (MONAI's
    ``CheckpointLoader`` with the trainer added to ``load_dict``; ``weights_only`` loading).

    Args:
        load_path: the checkpoint file.
        load_dict: the objects to restore, as saved (the trainer is added here).
        map_location: where tensors are loaded to.
    """

    def __init__(self, load_path: str | os.PathLike, load_dict: dict, map_location=None) -> None:
        if not os.path.isfile(load_path):
            raise InputError(
                f"checkpoint to resume from {str(load_path)!r} does not exist: give a checkpoint_epoch=N.pt file"
            )
        self.load_path = str(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader

        load_dict = {**self.load_dict, "trainer": engine}
        CheckpointLoader(self.load_path, load_dict, map_location=self.map_location).attach(engine)


def resume_handlers(load_path: str | os.PathLike | None, load_dict: dict, map_location=None) -> list:
    """``[ResumeFromCheckpoint(...)]`` when ``load_path`` is given, else ``[]`` (for configs)."""
    return [ResumeFromCheckpoint(load_path, load_dict, map_location)] if load_path else []


def recalibrate_encoder_bn(
    model: nn.Module,
    slices: Iterable[torch.Tensor],
    multiple: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> int:
    """Re-estimates the running statistics of the encoder's BatchNorm layers on full slices.

    Why: with ``encoder_bn="batch_stats"`` (the paper) the encoder's BatchNorm runs on batch statistics
    in training and its running statistics drift towards those of the training crops (128^2); inference
    (eval mode) then normalises full slices (512^2, more air and table, different feature statistics)
    with them. This replaces them with statistics of ``slices``: the running statistics are reset and
    accumulated with ``momentum=None`` (PyTorch's cumulative average of the per-batch statistics) while
    the encoder sees each batch of slices, padded as at inference. Nothing else changes (no weights, no decoder, no feature augmentation).
    Only for ``encoder_bn="batch_stats"``: a ``"frozen"`` encoder keeps CLIP's own statistics.
    ``benchmarks/encoder_bn_recalibration.py`` measures the effect.

    Args:
        model: a ``CLIPDenoiser`` (or a DDP wrapper of one).
        slices: (B, C, H, W) batches in the model range, typically the training patients' full slices.
        multiple: padding multiple, as at inference (32).
        device: where to run (default: the model's device).
        progress: show a tqdm bar.

    Returns:
        the number of slices seen.
    """
    from tqdm.auto import tqdm

    from ldct_clip.networks import pad_to_multiple

    model = getattr(model, "module", model)
    if getattr(model, "encoder_bn", "batch_stats") == "frozen":
        raise InputError(
            "encoder_bn='frozen' keeps CLIP's BatchNorm statistics; recalibration is for 'batch_stats'"
        )
    layers = [m for m in model.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.train()
        with torch.no_grad():
            for batch in tqdm(
                slices, desc="encoder BatchNorm statistics", unit="batch", disable=not progress
            ):
                x = torch.as_tensor(batch, dtype=torch.float32, device=device)
                model.encode(pad_to_multiple(x, multiple))
                seen += x.shape[0]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise InputError("no slices to re-estimate the encoder's BatchNorm statistics on")
    return seen


def is_main_process() -> bool:
    """True on rank 0 or without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed(backend: str | None = None, required: bool = False) -> dict:
    """Starts the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else does nothing.

    Backend: NCCL when CUDA is available, else gloo. Each rank uses GPU ``LOCAL_RANK``. All ranks meet at a
    barrier before returning.

    Args:
        backend: force a backend ("gloo", "nccl").
        required: raise unless launched by torchrun with more than one process.

    Returns:
        ``{"rank", "world_size", "local_rank", "device"}``.

    Raises:
        InputError: ``required`` and not launched by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if required and world_size < 2:
        raise InputError(
            "the multi-GPU config needs several processes: launch with "
            "torchrun --nproc_per_node=N -m ldct_clip train --config train.json --config multi_gpu_train.json"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    if dist.is_initialized():
        dist.barrier()
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "local_rank": local_rank,
            "device": device,
        }
    return {"rank": 0, "world_size": 1, "local_rank": local_rank, "device": device}


def wrap_ddp(network: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``DistributedDataParallel`` around ``network`` in a distributed run, else ``network`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return network
    device = torch.device(device) if device is not None else torch.device("cpu")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def cleanup_distributed() -> None:
    """Ends the process group if there is one (the bundle's ``finalize``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_process_only(handlers: Sequence) -> list:
    """``handlers`` on rank 0, an empty list elsewhere (for logging handlers in configs).

    Entries may be factories (config components with ``"_mode_": "callable"``): they are only called on
    rank 0, so other ranks never even create, e.g., a TensorBoard event file.
    """
    if not is_main_process():
        return []
    return [h() if isinstance(h, functools.partial) else h for h in handlers]
