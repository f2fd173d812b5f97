"""Finding and strictly loading the CLIP image-tower weights of the encoder.

``encoder_weights`` may be an open_clip pretrained tag (``"openai"``), resolved with open_clip's own
configuration and download code (Hugging Face hub cache, ``HF_HUB_OFFLINE``), or a local file: OpenAI's
TorchScript ``RN50.pt``, an open_clip checkpoint (``.pt``/``.bin``/``.safetensors``, keys ``visual.*``)
or a visual-only state dict. Unlike the reference code, which copies whatever keys happen to match,
loading is strict: every encoder tensor must be provided, with its shape, and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from safetensors.torch import load_file as load_safetensors

from ldct_clip.errors import WeightsError
from ldct_clip.networks.encoder import UNUSED_ENCODER_PREFIXES
from ldct_clip.networks.state_dict import check_state_dict_fits, name_some, strip_prefix

__all__ = [
    "sha256_of",
    "pretrained_cfg",
    "cached_pretrained_file",
    "download_instructions",
    "looks_like_path",
    "resolve_encoder_weights",
    "read_encoder_state_dict",
    "load_encoder_weights",
]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl")
_TRUE = ("1", "on", "yes", "true")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE``, read now and as huggingface_hub saw it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    return bool(hf_constants.HF_HUB_OFFLINE)


def pretrained_cfg(clip_model: str, tag: str) -> dict:
    """open_clip's pretrained configuration (``url``, ``hf_hub``, ...) for ``clip_model`` and ``tag``."""
    cfg = open_clip.pretrained.get_pretrained_cfg(clip_model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(clip_model)
        raise WeightsError(
            f"encoder_weights={tag!r} is neither an existing file nor an open_clip pretrained tag of "
            f"{clip_model} (tags: {', '.join(tags) or 'none'}); pass a tag or the path of a weight file"
        )
    return cfg


def _hub_candidates(cfg: Mapping) -> tuple[str, list[str]] | None:
    """Hub repository and the file names open_clip would fetch from it, in its order of preference."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    # open_clip first tries a safetensors twin of the .bin it names (pretrained._get_safe_alternatives).
    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, [*names, filename]


def _url_cache_file(cfg: Mapping, cache_dir: str | None) -> Path | None:
    url = cfg.get("url", "")
    if not url:
        return None
    # Where open_clip.pretrained.download_pretrained_from_url keeps its downloads.
    return Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)


def cached_pretrained_file(clip_model: str, tag: str, cache_dir: str | None = None) -> Path | None:
    """The local file of an open_clip pretrained tag, looked up in the caches only (never the network).

    Looks where open_clip would put it: the Hugging Face hub cache (``HF_HOME``/``HF_HUB_CACHE`` or
    ``cache_dir``) for the tag's ``hf_hub`` entry, then open_clip's URL cache (``~/.cache/clip`` or
    ``cache_dir``) for its ``url`` entry.
    """
    cfg = pretrained_cfg(clip_model, tag)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub = _hub_candidates(cfg)
    if hub is not None:
        repo_id, names = hub
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url_file = _url_cache_file(cfg, cache_dir)
    if url_file is not None and url_file.is_file():
        return url_file
    return None


def download_instructions(clip_model: str, tag: str) -> str:
    """What to download for ``clip_model``/``tag`` and how to hand it over, in one line."""
    cfg = pretrained_cfg(clip_model, tag)
    sources = []
    hub = _hub_candidates(cfg)
    if hub is not None:
        repo_id, names = hub
        sources.append(f"{names[-1]} from https://huggingface.co/{repo_id} (Hugging Face hub id {repo_id})")
    if cfg.get("url"):
        sources.append(cfg["url"])
    file_name = os.path.basename(cfg.get("url", "")) or (hub[1][-1] if hub else f"{clip_model}.pt")
    return (
        f"download {' or '.join(sources)} on a machine with internet access and pass the file with "
        f"encoder_weights='/path/to/{file_name}' (CLI: --encoder-weights /path/to/{file_name}), "
        "or copy a Hugging Face cache that holds it to HF_HOME"
    )


def looks_like_path(value: str | os.PathLike) -> bool:
    if isinstance(value, os.PathLike):
        return True
    return os.sep in value or "/" in value or value.lower().endswith(WEIGHT_SUFFIXES) or Path(value).exists()


def resolve_encoder_weights(
    clip_model: str, encoder_weights: str | os.PathLike, cache_dir: str | None = None
) -> Path:
    """The local file holding the CLIP weights named by ``encoder_weights``.

    Args:
        clip_model: open_clip architecture name (``"RN50"``), used to resolve a tag.
        encoder_weights: an open_clip pretrained tag (``"openai"``) or a path to a weight file.
        cache_dir: open_clip/Hugging Face cache directory; ``None`` for their defaults.

    Raises:
        WeightsError: the file does not exist, the tag is unknown, or the weights are neither cached nor
            downloadable (offline): the message names what to download and how to pass it.
    """
    if looks_like_path(encoder_weights):
        path = Path(encoder_weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"CLIP weight file {path} does not exist; pass an existing file (OpenAI's RN50.pt, an "
                "open_clip .pt/.bin/.safetensors) or an open_clip tag such as 'openai'"
            )
        return path
    tag = str(encoder_weights)
    cfg = pretrained_cfg(clip_model, tag)
    cached = cached_pretrained_file(clip_model, tag, cache_dir)
    if cached is not None:
        return cached
    if hub_offline():
        raise WeightsError(
            f"CLIP weights {clip_model}/{tag} are not in the local cache and HF_HUB_OFFLINE is set: "
            + download_instructions(clip_model, tag)
        )
    try:
        target = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as error:  # any network/hub failure ends in the same advice
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"CLIP weights {clip_model}/{tag} could not be downloaded ({reason[:160]}): "
            + download_instructions(clip_model, tag)
        ) from None
    if not target or not Path(target).is_file():
        raise WeightsError(f"CLIP weights {clip_model}/{tag}: " + download_instructions(clip_model, tag))
    return Path(target)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _read_any(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    if _is_torchscript(path):
        # OpenAI's released RN50.pt is a TorchScript archive; only its tensors are used.
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)


def _visual_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{path} holds no state dict (found {type(obj).__name__}); pass a CLIP weight file"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    tensors = strip_prefix(tensors, "module.")
    visual = {k[len("visual.") :]: v for k, v in tensors.items() if k.startswith("visual.")}
    if visual:
        return visual
    if "conv1.weight" in tensors:  # already the image tower alone
        return tensors
    raise WeightsError(
        f"{path} has no CLIP image-tower weights (no 'visual.*' keys, no 'conv1.weight'; found "
        f"{name_some(list(tensors))}); pass OpenAI's RN50.pt or an open_clip checkpoint"
    )


def read_encoder_state_dict(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The image-tower tensors of a CLIP weight file, keys as in open_clip's ``ModifiedResNet``.

    Args:
        path: OpenAI TorchScript archive, open_clip checkpoint (``visual.*`` keys, possibly under
            ``"state_dict"`` and/or with a ``module.`` prefix; ``.pt``/``.bin``/``.safetensors``) or a
            visual-only state dict. Plain checkpoints load with ``weights_only=True``.
        sha256: expected SHA-256 of the file (hex), checked before anything is loaded.

    Raises:
        WeightsError: wrong checksum, unreadable/truncated file, or no image-tower weights in it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"CLIP weight file {path} does not exist")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual.lower() != sha256.strip().lower():
            raise WeightsError(
                f"{path} has SHA-256 {actual}, expected {sha256}; the file is corrupt or another "
                "release: download it again"
            )
    try:
        obj = _read_any(path)
    except Exception as error:  # torch/zip/pickle/safetensors all fail differently on a bad file
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsError(
            f"cannot read CLIP weights from {path} ({type(error).__name__}: {detail}); the file is "
            "truncated, corrupt or not a weight file: download it again"
        ) from None
    return _visual_state_dict(obj, path)


def load_encoder_weights(
    encoder: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "CLIP encoder weights"
) -> None:
    """Copy an image-tower state dict into ``encoder``, strictly; layer4/attnpool entries are dropped.

    Args:
        encoder: the :class:`~ldct_clip.networks.encoder.CLIPDenseEncoder`.
        state_dict: keys as in open_clip's ``ModifiedResNet`` (``conv1.weight``, ``layer1.0.bn1.bias``...).
            Tensors are cast to the encoder's dtype (OpenAI's TorchScript weights are float16).
        source: where the weights come from, for the error message.

    Raises:
        WeightsError: naming missing, unexpected and shape-mismatched keys.
    """
    used = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_ENCODER_PREFIXES)}
    own = encoder.state_dict()
    check_state_dict_fits(own, used, source, optional_suffixes=("num_batches_tracked",))
    with torch.no_grad():
        for key, value in used.items():
            own[key].copy_(value)
