"""Trained weights into the network: the bundles' checkpoint handler, and a loader for library callers."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader
from torch import nn

from ldct_clip.errors import WeightsError
from ldct_clip.inference.device import resolve_device
from ldct_clip.io.provenance import Provenance
from ldct_clip.networks import load_checkpoint, load_model, load_model_weights
from ldct_clip.networks.state_dict import check_state_dict_fits, strip_prefix

__all__ = ["WeightsLoader", "load_denoiser"]


class WeightsLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for the bundles' trained weights, reading the file once.

    What it adds to ``CheckpointLoader`` (whose ``Checkpoint.load_objects`` does the loading):

    - one read of the file, which gives its sha256 as well: weights shipped with a bundle are checked
      against ``metadata.json`` (a damaged copy or a Git LFS pointer is refused), and the sha256 goes into
      the provenance of every output;
    - ``torch.load(weights_only=True)`` of ldct-clip checkpoints (``{"model": state_dict, "network": ...}``),
      ``{"model": ...}`` files and bare state dicts (a ``module.`` prefix of DDP is dropped);
    - one-line :class:`~ldct_clip.errors.WeightsError` messages naming what does not fit;
    - loading once per process: a pipeline that runs its evaluator once per series reads the weights once.

    Args:
        load_path: the weights file.
        network: the network the weights load into.
        expected_sha256: the sha256 the file must have (the bundle's shipped weights), or None.
        bundle_name: the bundle, for the provenance.
        bundle_version: its version (``metadata.json``), for the provenance.
        demo_weights: whether these are the bundle's demo weights (said in every output they make).
        command: the command line, for the provenance.
        hint: what the user can do instead, appended to the error messages.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        network: nn.Module,
        expected_sha256: str | None = None,
        bundle_name: str = "",
        bundle_version: str = "",
        demo_weights: bool = False,
        command: str = "",
        hint: str = "pass another weights file",
    ) -> None:
        super().__init__(load_path=str(load_path), load_dict={"model": network}, strict=True)
        self.network = network
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.bundle_name = bundle_name
        self.bundle_version = str(bundle_version)
        self.demo_weights = demo_weights
        self.command = command
        self.hint = hint
        self.sha256: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.sha256 is None:
            self.load()

    def load(self) -> None:
        """Read, check and load the weights (idempotent)."""
        path = Path(self.load_path).expanduser()
        if not path.is_file():
            raise WeightsError(f"no trained weights at {path} (the file does not exist): {self.hint}")
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        if self.expected_sha256 and sha256 != self.expected_sha256:
            raise WeightsError(
                f"{path} is not the weights bundle {self.bundle_name} ships (sha256 {sha256[:12]}..., "
                f"metadata.json says {self.expected_sha256[:12]}...): the copy is damaged or a Git LFS pointer; "
                f"reinstall ldct-clip, or {self.hint}"
            )
        if not data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (or, legacy, a pickle)
            raise WeightsError(
                f"cannot read weights {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle; "
                f"{len(data)} bytes): {self.hint}"
            )
        try:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a damaged or foreign file
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise WeightsError(
                f"cannot read weights {path} ({type(error).__name__}: {detail}); the file is truncated, "
                f"corrupt or not a PyTorch checkpoint: {self.hint}"
            ) from None
        if not isinstance(checkpoint, Mapping):
            raise WeightsError(
                f"weights {path} hold a {type(checkpoint).__name__}, not a state dict; {self.hint}"
            )
        source = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
        state = strip_prefix({k: v for k, v in source.items() if isinstance(v, torch.Tensor)}, "module.")
        try:
            check_state_dict_fits(self.network.state_dict(), state, f"the weights in {path}")
        except WeightsError as error:
            raise WeightsError(f"{error}{_architecture_hint(checkpoint, self.network)}") from None
        Checkpoint.load_objects(to_load={"model": self.network}, checkpoint={"model": state}, strict=True)
        self.sha256 = sha256

    @property
    def provenance(self) -> Provenance:
        """What made the outputs: weights name and sha256, bundle, ldct-clip version (after :meth:`load`)."""
        if self.sha256 is None:
            self.load()
        return Provenance(
            weights_name=Path(self.load_path).name,
            weights_sha256=str(self.sha256),
            bundle_name=self.bundle_name,
            bundle_version=self.bundle_version,
            demo_weights=self.demo_weights and self.expected_sha256 == self.sha256,
            command=self.command,
        )


#: Settings of the network that change no weight's shape (training behaviour only).
_TRAINING_ONLY = ("aug_level", "encoder_bn", "encoder_weights")


def _architecture_hint(checkpoint: Mapping, network: nn.Module) -> str:
    """For an ldct-clip checkpoint of another architecture: the overrides that build the network it fits."""
    stored = checkpoint.get("network")
    current = getattr(network, "config", None)
    if not isinstance(stored, Mapping) or not isinstance(current, Mapping):
        return ""
    differ = {k: v for k, v in stored.items() if k not in _TRAINING_ONLY and current.get(k) != v}
    if not differ:
        return ""
    pairs = " ".join(f"network_def#{k}={_json(v)}" for k, v in sorted(differ.items()))
    return (
        f" (the checkpoint was saved from another network: override {pairs}; ldct-clip: --set KEY=VALUE, "
        "monai.bundle run: --KEY VALUE)"
    )


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def load_denoiser(
    ckpt_path: str | os.PathLike,
    network_def: nn.Module | Callable[[], nn.Module] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The network for inference, in eval mode on ``device``, from a checkpoint file (library callers).

    A checkpoint written by ldct-clip (``save_checkpoint``, ``ldct-clip train`` or ``import-reference``)
    rebuilds its own architecture; a bare state dict or ``{"model": state_dict}`` (MONAI
    ``CheckpointSaver``) is loaded into ``network_def``.

    Args:
        ckpt_path: the weights file.
        network_def: network (or a function building it, called only when needed) to load a bare state
            dict into; ignored for ldct-clip checkpoints.
        device: where the network is put.

    Raises:
        WeightsError: missing/unreadable file, or weights that fit neither the checkpoint's own
            architecture nor ``network_def``.
    """
    checkpoint = load_checkpoint(ckpt_path)
    if isinstance(checkpoint.get("network"), Mapping):
        model = load_model(checkpoint)
    elif network_def is not None:
        if not isinstance(network_def, nn.Module):
            network_def = network_def()
        model = load_model_weights(network_def, checkpoint)
    else:
        raise WeightsError(
            f"{ckpt_path} is a bare state dict without the network's configuration; give the network it "
            "belongs to (the bundle's network_def) or re-save it with ldct_clip.networks.save_checkpoint"
        )
    return model.to(resolve_device(device)).eval()
