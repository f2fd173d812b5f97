"""Inference of the 2-D network over CT volumes and images: device policy, predictor, inferers, loading."""

from ldct_clip.inference.backends import (
    BACKENDS,
    PreparedNetwork,
    available_backends,
    backend_cache_dir,
    choose_backend,
    prepare_network,
)
from ldct_clip.inference.device import (
    CPU_AMP_DEFAULT,
    DEFAULT_BATCH_SIZE,
    cpu_bf16_is_faster,
    default_batch_size,
    default_channels_last,
    limit_heap_fragmentation,
    resolve_amp,
    resolve_device,
)
from ldct_clip.inference.inferers import (
    CTSliceInferer,
    HUBatchConversion,
    ImageInferer,
    SliceBatchInferer,
    make_inferer,
)
from ldct_clip.inference.loading import WeightsLoader, load_denoiser
from ldct_clip.inference.machine import cpu_description, instruction_set_caps, machine_name
from ldct_clip.inference.memory import bounded_batch_size
from ldct_clip.inference.predictor import PAD_MULTIPLE, SlicePredictor
from ldct_clip.inference.volume import denoise_volume

__all__ = [
    "BACKENDS",
    "CPU_AMP_DEFAULT",
    "DEFAULT_BATCH_SIZE",
    "CTSliceInferer",
    "HUBatchConversion",
    "ImageInferer",
    "PAD_MULTIPLE",
    "PreparedNetwork",
    "SliceBatchInferer",
    "SlicePredictor",
    "WeightsLoader",
    "available_backends",
    "backend_cache_dir",
    "bounded_batch_size",
    "choose_backend",
    "cpu_bf16_is_faster",
    "cpu_description",
    "default_batch_size",
    "default_channels_last",
    "denoise_volume",
    "instruction_set_caps",
    "limit_heap_fragmentation",
    "load_denoiser",
    "machine_name",
    "make_inferer",
    "prepare_network",
    "resolve_amp",
    "resolve_device",
]
