"""The CLIP denoiser network, its CLIP weights, checkpoints and the import of reference checkpoints."""

from ldct_clip.networks.checkpoint import load_checkpoint, load_model, load_model_weights, save_checkpoint
from ldct_clip.networks.clip_weights import (
    cached_pretrained_file,
    load_encoder_weights,
    read_encoder_state_dict,
    resolve_encoder_weights,
)
from ldct_clip.networks.denoiser import CLIPDenoiser, pad_to_multiple
from ldct_clip.networks.encoder import CLIPDenseEncoder
from ldct_clip.networks.reference import (
    infer_network_config,
    load_reference_state_dict,
    read_reference_checkpoint,
)

__all__ = [
    "CLIPDenoiser",
    "CLIPDenseEncoder",
    "cached_pretrained_file",
    "infer_network_config",
    "load_checkpoint",
    "load_encoder_weights",
    "load_model",
    "load_model_weights",
    "load_reference_state_dict",
    "pad_to_multiple",
    "read_encoder_state_dict",
    "read_reference_checkpoint",
    "resolve_encoder_weights",
    "save_checkpoint",
]
