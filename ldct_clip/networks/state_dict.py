"""Strict comparison of a state dict with a module's, with one-line errors naming what does not fit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ldct_clip.errors import WeightsError

__all__ = ["name_some", "check_state_dict_fits", "strip_prefix"]


def name_some(names: Iterable[str], limit: int = 3) -> str:
    """``'a', 'b', 'c' and 5 more``: enough to recognise the problem, short enough for one line."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys when every key has it (``module.`` of DataParallel/DDP)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def check_state_dict_fits(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    what: str,
    optional_suffixes: tuple[str, ...] = (),
) -> None:
    """Raise :class:`WeightsError` unless ``given`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: the module's own state dict.
        given: the state dict to load.
        what: what is being loaded, for the message (e.g. ``"CLIP encoder weights from RN50.pt"``).
        optional_suffixes: keys of ``expected`` ending like this may be absent from ``given``
            (e.g. ``num_batches_tracked``, which older checkpoints lack).
    """
    missing = [k for k in expected if k not in given and not k.endswith(optional_suffixes)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({name_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({name_some(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) ({name_some(mismatched)}; given != model)")
    if problems:
        raise WeightsError(
            f"{what} do not fit the network: {'; '.join(problems)}; "
            "check that the file and the network configuration (clip_model/layers/width, channels, bias) match"
        )
