"""What makes a run resumable bit for bit: seeding, the random-number state of every rank, the network's
constructor arguments in checkpoints, and restoring a checkpoint when the trainer starts."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from torch import nn

from ldct_clip.errors import InputError
from ldct_clip.networks import load_model_weights

__all__ = [
    "NetworkConfig",
    "ResumeFromCheckpoint",
    "TrainingState",
    "resume_handlers",
    "seed_everything",
    "warm_start",
]


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
    ``CheckpointSaver``/``CheckpointLoader``: python, numpy, torch and cuda generators of every rank, and
    the training step's format (precision, memory format) when ``step`` is given.

    In a distributed run ``state_dict`` gathers every rank's state (a collective call: ``CheckpointSaver``
    must run on every rank, which is how ignite expects it) and ``load_state_dict`` gives each rank its
    own; a checkpoint from a different world size restores rank ``r mod n``'s state.

    Args:
        step: the trainer's ``ldct_clip.training.TrainingStepInferer``, whose measured format a resumed run
            keeps (a format measured again could differ, and with it the numbers). Stored here rather
            than as an entry of its own so that checkpoints written without it still load.
    """

    def __init__(self, step=None) -> None:
        self.step = step

    def state_dict(self) -> dict:
        state = _rng_state()
        step = {"step": self.step.state_dict()} if self.step is not None else {}
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)
            return {"ranks": gathered, **step}
        return {"ranks": [state], **step}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        _set_rng_state(ranks[rank % len(ranks)])
        if self.step is not None:
            self.step.load_state_dict(state.get("step", {}))


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


class ResumeFromCheckpoint:
    """Restores a run from a ``TrainingCheckpointer`` checkpoint when the trainer starts (MONAI's
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
        load_dict = {**self.load_dict, "trainer": engine}
        CheckpointLoader(self.load_path, load_dict, map_location=self.map_location).attach(engine)


def resume_handlers(load_path: str | os.PathLike | None, load_dict: dict, map_location=None) -> list:
    """``[ResumeFromCheckpoint(...)]`` when ``load_path`` is given, else ``[]`` (for configs)."""
    return [ResumeFromCheckpoint(load_path, load_dict, map_location)] if load_path else []


def warm_start(network: nn.Module, weights: str | os.PathLike | None) -> nn.Module:
    """``network`` with the trained weights of ``weights`` loaded (fine-tuning), or unchanged when ``None``.

    A warm start is not a resume: only the network's tensors are taken (the frozen encoder's among them, so
    a random-init encoder stays the one the weights were trained with); the optimizer, the learning-rate
    schedule and the iteration count start fresh. Use it to continue training shipped or published
    weights on your own scanner's data.

    Args:
        network: the network the config built.
        weights: an ldct-clip checkpoint or model file (``model.pt``, ``best.pt``, a bundle's
            ``models/model.pt``) of the same architecture.

    Raises:
        WeightsError: unreadable file, or tensors that do not fit ``network`` (named).
    """
    if weights is None:
        return network
    return load_model_weights(network, weights)
