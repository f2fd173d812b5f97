"""The pairs loop: for each low-/normal-dose pair, load, denoise, and score the input and the output.

One loop for every evaluation: ``ldct-clip evaluate`` (a :class:`~ldct_clip.evaluation.MetricTable` of the
records), ``ldct-clip benchmark`` (the low-dose and model rows; the classical baselines are run per slice by
the benchmark report) and the demo (its metrics). The denoiser is a parameter, so the same loop runs the
network loaded from a checkpoint, a bundle's pipeline, or nothing (the input scored alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor

from ldct_clip.conventions import ORIENTATION
from ldct_clip.data.layouts import load_pair_volumes
from ldct_clip.errors import InputError
from ldct_clip.evaluation.display import display_pixel_spacing, oriented_slice, volume_affine
from ldct_clip.evaluation.metrics import compute_ct_metrics
from ldct_clip.evaluation.protocols import CTProtocol, Protocol, get_protocol
from ldct_clip.inference import denoise_volume

__all__ = ["Denoiser", "PairRecord", "PairSource", "network_denoiser", "score_pairs", "select_slices"]

#: ``denoise(volume_hu) -> volume_hu``: a ``(1, X, Y, Z)`` HU volume in, the denoised HU volume of the same
#: shape out. A MetaTensor is oriented by its affine (show the network its slices in
#: ``ldct_clip.conventions.ORIENTATION``); a plain tensor's slices are stored as the network sees them
#: already (Mayo npy slices) and must be denoised as they are (``CTSliceInferer``'s convention).
Denoiser = Callable[[torch.Tensor], torch.Tensor]

#: A pair: an entry of ``find_pairs`` (loaded here), or ``(patient, low, normal)`` /
#: ``(patient, low, normal, slices_oriented)`` with HU volumes shaped (1, X, Y, Z) in memory.
PairSource = Mapping | tuple

#: Groups of the scores: the low-dose input and the denoised output, each against normal dose.
GROUPS = ("input", "denoised")
#: Slices scored per call of the metrics (bounds the memory of the SSIM maps).
SCORE_CHUNK = 16


def network_denoiser(model: torch.nn.Module, **options) -> Denoiser:
    """The :data:`Denoiser` of a loaded network: :func:`ldct_clip.inference.denoise_volume`, showing the
    network MetaTensor slices in ``conventions.ORIENTATION`` and plain tensors' slices as stored.

    Args:
        model: the 2-D network (``ldct_clip.inference.load_denoiser``).
        options: further arguments of ``denoise_volume`` (device, batch_size, amp, progress...).
    """

    def denoise(volume_hu: torch.Tensor) -> torch.Tensor:
        axcodes = ORIENTATION if isinstance(volume_hu, MetaTensor) else None
        return denoise_volume(volume_hu, model, axcodes=axcodes, **options)

    return denoise


def select_slices(n_slices: int, max_slices: int | None) -> list[int]:
    """All slice indices, or ``max_slices`` of them evenly spaced over the volume (first and last kept)."""
    if max_slices is None or max_slices >= n_slices:
        return list(range(n_slices))
    if max_slices < 1:
        raise InputError(f"--max-slices must be at least 1, got {max_slices}")
    return sorted({int(round(i)) for i in np.linspace(0, n_slices - 1, max_slices)})


@dataclass
class PairRecord:
    """What the loop measured on one pair.

    Attributes:
        patient: the patient id.
        shape: (X, Y, Z) of the whole volume.
        indices: positions of the scored slices in the volume.
        slice_numbers: their numbers (the file numbers of Mayo npy slices, else the positions).
        low: the low-dose HU volume of the scored slices, (1, X, Y, n).
        full: the normal-dose HU volume of the scored slices.
        denoised: the denoiser's output for ``low``; None without a denoiser.
        oriented: the slices are stored in display orientation (Mayo npy), not oriented by an affine.
        affine: the normal-dose volume's affine (None when ``oriented`` or not a MetaTensor).
        scores: protocol name -> group ("input", "denoised") -> metric -> (n,) per-slice values.
        seconds_per_slice: the denoiser's time divided by the slices (NaN without a denoiser).
    """

    patient: str
    shape: tuple[int, int, int]
    indices: list[int]
    slice_numbers: list[int]
    low: torch.Tensor
    full: torch.Tensor
    denoised: torch.Tensor | None
    oriented: bool
    affine: np.ndarray | None
    scores: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    seconds_per_slice: float = float("nan")

    @property
    def pixel_spacing(self) -> tuple[float, float] | None:
        """(row, column) mm of the display slices; None when unknown."""
        return display_pixel_spacing(self.affine)

    def display(self, which: str, position: int) -> np.ndarray:
        """Slice ``position`` (of the scored ones) of ``"low"``, ``"full"`` or ``"denoised"`` in display
        orientation (anterior up, the patient's right on the left), float64 HU."""
        volume = getattr(self, which)
        return oriented_slice(volume[0, ..., position], self.affine, self.oriented)


def _as_volume(volume: torch.Tensor, name: str) -> torch.Tensor:
    t = volume if isinstance(volume, torch.Tensor) else torch.as_tensor(volume)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1:
        raise InputError(f"{name}: expected a CT volume shaped (1, X, Y, Z), got {tuple(t.shape)}")
    return t


def _load(source: PairSource) -> tuple[str, torch.Tensor, torch.Tensor, bool, list[int] | None]:
    if isinstance(source, Mapping):
        low, full, oriented = load_pair_volumes(dict(source))
        return str(source["patient"]), low, full, oriented, source.get("slices")
    patient, low, full = source[:3]
    oriented = bool(source[3]) if len(source) > 3 else False
    low, full = _as_volume(low, f"{patient} low dose"), _as_volume(full, f"{patient} normal dose")
    if low.shape != full.shape:
        raise InputError(
            f"patient {patient}: low dose {tuple(low.shape)} and normal dose {tuple(full.shape)} differ "
            "in shape; give registered pairs of the same geometry"
        )
    return str(patient), low, full, oriented, None


def _network_view(volume: torch.Tensor, oriented: bool) -> torch.Tensor:
    """What the denoiser is given: a plain tensor for slices stored as the network sees them, else a
    MetaTensor (a plain tensor without affine is taken as RAS, as the figures take it)."""
    if oriented:
        return volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    return volume if isinstance(volume, MetaTensor) else MetaTensor(volume)


def _slice_batch(
    volume: torch.Tensor, positions: Sequence[int], record: PairRecord, display: bool
) -> torch.Tensor:
    if display:
        return torch.from_numpy(
            np.stack([oriented_slice(volume[0, ..., p], record.affine, record.oriented) for p in positions])
        )[:, None]
    data = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    return data[0].permute(2, 0, 1)[positions[0] : positions[-1] + 1, None].float()


def _score(record: PairRecord, protocols: Sequence[CTProtocol], display: bool) -> None:
    """Per-slice scores of the input and the output against normal dose, in chunks of slices."""
    groups = dict(zip(GROUPS, (record.low, record.denoised)))
    values: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {
        p.name: {g: {} for g, v in groups.items() if v is not None} for p in protocols
    }
    n = len(record.indices)
    for start in range(0, n, SCORE_CHUNK):
        positions = list(range(start, min(start + SCORE_CHUNK, n)))
        reference = _slice_batch(record.full, positions, record, display)
        for group, volume in groups.items():
            if volume is None:
                continue
            batch = _slice_batch(volume, positions, record, display)
            for proto in protocols:
                for metric, v in compute_ct_metrics(batch, reference, proto).items():
                    values[proto.name][group].setdefault(metric, []).append(v)
    record.scores = {
        p: {g: {m: torch.cat(chunks) for m, chunks in metrics.items()} for g, metrics in by_group.items()}
        for p, by_group in values.items()
    }


def score_pairs(
    pairs: Iterable[PairSource],
    denoise: Denoiser | None = None,
    protocols: Sequence[str | Protocol] = ("paper",),
    anatomy: str = "abdomen",
    max_slices: int | None = None,
    display: bool = False,
    warm_up: int = 0,
) -> Iterator[PairRecord]:
    """For each pair: load it, denoise the low-dose slices, and score input and output against normal dose.

    Args:
        pairs: ``find_pairs`` entries (loaded one at a time) or in-memory ``(patient, low, normal[,
            slices_oriented])`` tuples of (1, X, Y, Z) HU volumes; ``slices_oriented`` says that
            ``volume[0, ..., z]`` is already a slice in display orientation (as Mayo npy slices are).
        denoise: ``volume -> volume`` in HU (see :data:`Denoiser`); None scores the input alone.
        protocols: CT protocols to score under (names or protocol objects); ``"ldctbench"`` takes
            ``anatomy``.
        anatomy: window of ``"ldctbench"``.
        max_slices: at most this many slices per pair, evenly spaced (:func:`select_slices`); None: all.
        display: score the slices in display orientation (as the benchmark, whose ROIs and figures are on
            display slices, has always scored them) instead of as stored; the scores differ only by float32
            rounding of the SSIM sums.
        warm_up: before the first pair, run the denoiser untimed on up to this many slices (first calls pay
            for kernel selection and memory pools), so that ``seconds_per_slice`` measures the steady state.

    Yields:
        a :class:`PairRecord` per pair, in the order of ``pairs``.

    Raises:
        InputError: a pair that cannot be loaded, volumes that differ in shape, a protocol that is not a CT
            one, or a denoiser output of another shape.
    """
    resolved = [get_protocol(p, anatomy) for p in protocols]
    for proto in resolved:
        if not isinstance(proto, CTProtocol):
            raise InputError(
                f"protocol {proto.name!r} scores RGB images, not CT pairs: use paper, redcnn or ldctbench"
            )
    warmed_up = warm_up <= 0
    for source in pairs:
        patient, low, full, oriented, numbers = _load(source)
        shape = tuple(int(s) for s in low.shape[1:])
        indices = select_slices(shape[-1], max_slices)
        if len(indices) < shape[-1]:
            low, full = low[..., indices], full[..., indices]
        record = PairRecord(
            patient=patient,
            shape=shape,
            indices=indices,
            slice_numbers=[int(numbers[i]) for i in indices] if numbers else list(indices),
            low=low,
            full=full,
            denoised=None,
            oriented=oriented,
            affine=None if oriented else volume_affine(full),
        )
        if denoise is not None:
            given = _network_view(low, oriented)
            if not warmed_up:
                denoise(given[..., :warm_up])
                warmed_up = True
            start = time.perf_counter()
            denoised = denoise(given)
            record.seconds_per_slice = (time.perf_counter() - start) / len(indices)
            if tuple(denoised.shape) != tuple(low.shape):
                raise InputError(
                    f"the denoiser returned shape {tuple(denoised.shape)} for {tuple(low.shape)}"
                )
            record.denoised = denoised
        _score(record, resolved, display)
        yield record
