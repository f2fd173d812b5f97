"""Our checkpoint format: ``{"model": state_dict, "network": constructor kwargs, "ldct_clip_version", ...}``.

``network`` lets :func:`load_model` rebuild the network without knowing its configuration; the encoder
weights travel in ``model`` (``encoder_weights`` is never stored). Bare state dicts and ``{"model": sd}``
files (MONAI ``CheckpointSaver`` style) load into an existing network with :func:`load_model_weights`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ldct_clip import __version__
from ldct_clip.errors import InputError, WeightsError
from ldct_clip.networks.denoiser import CLIPDenoiser
from ldct_clip.networks.state_dict import check_state_dict_fits, strip_prefix

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "load_model_weights"]

_RESERVED = ("model", "network", "ldct_clip_version")


def save_checkpoint(path: str | os.PathLike, model: CLIPDenoiser, extra: Mapping | None = None) -> Path:
    """Write ``model`` as ``{"model", "network", "ldct_clip_version", **extra}``, atomically.

    Args:
        path: destination file (its folder must exist); replaced only once the new file is complete.
        model: the network; its ``config`` (constructor kwargs without ``encoder_weights``) is stored.
        extra: more entries (e.g. ``{"iteration": 40000}``); must not use the reserved keys and must be
            loadable with ``weights_only=True`` (tensors, numbers, strings, lists, dicts).
    """
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise InputError(f"extra must not contain the reserved checkpoint keys {clash}")
    payload = {
        "model": model.state_dict(),
        "network": dict(getattr(model, "config", {})),
        "ldct_clip_version": __version__,
        **extra,
    }
    path = Path(path)
    # A temporary file next to the target and os.replace: a crash never leaves a half-written checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        # mkstemp creates owner-only files; a checkpoint gets the permissions any new file would get
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def torch_load_file(path: Path, what: str, fix: str):
    """``torch.load`` (``weights_only=True``, on CPU) of a file, any failure as one WeightsError line.

    Args:
        path: the file.
        what: what the file is, for the messages (e.g. "checkpoint").
        fix: how the user fixes an unreadable file, appended to that message.
    """
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsError(f"cannot read {what} {path} ({type(error).__name__}: {detail}); {fix}") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file (``weights_only=True``, on CPU) into a dict.

    Raises:
        WeightsError: missing, truncated or corrupt file, or not a dict.
    """
    path = Path(path)
    obj = torch_load_file(path, "checkpoint", "the file is truncated, corrupt or not a PyTorch checkpoint")
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def _model_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    return strip_prefix({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, "module.")


def load_model_weights(model: torch.nn.Module, checkpoint: str | os.PathLike | Mapping) -> torch.nn.Module:
    """Load our checkpoint, a ``{"model": sd}`` file or a bare state dict into an existing network, strictly.

    Raises:
        WeightsError: unreadable file, or keys/shapes that do not fit (named).
    """
    source = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    state = _model_state(source)
    what = "checkpoint tensors" if isinstance(checkpoint, Mapping) else f"tensors of {checkpoint}"
    check_state_dict_fits(model.state_dict(), state, what)
    model.load_state_dict(state)
    return model


def load_model(path: str | os.PathLike | Mapping, **overrides) -> CLIPDenoiser:
    """Build a :class:`CLIPDenoiser` from a checkpoint's ``network`` kwargs and load its ``model`` weights.

    Args:
        path: a file written by :func:`save_checkpoint` (or :command:`ldct-clip import-reference`), or such a
            checkpoint already read with :func:`load_checkpoint`.
        overrides: constructor kwargs replacing stored ones (e.g. ``aug_level=0``, ``encoder_bn="frozen"``).

    Raises:
        WeightsError: unreadable file, no ``network`` entry, or weights that do not fit.
    """
    checkpoint = path if isinstance(path, Mapping) else load_checkpoint(path)
    name = "the checkpoint" if isinstance(path, Mapping) else str(path)
    network = checkpoint.get("network")
    if not isinstance(network, Mapping):
        raise WeightsError(
            f"{name} has no 'network' entry (not written by ldct-clip); build CLIPDenoiser(...) yourself and "
            "load it with ldct_clip.networks.load_model_weights(model, path), or convert a reference "
            "checkpoint with `ldct-clip import-reference`"
        )
    kwargs = {k: v for k, v in network.items() if k != "encoder_weights"}
    kwargs.update(overrides)
    try:
        model = CLIPDenoiser(**kwargs)
    except TypeError as error:
        raise WeightsError(f"{name}: its 'network' entry does not fit CLIPDenoiser ({error})") from None
    return load_model_weights(model, checkpoint)
