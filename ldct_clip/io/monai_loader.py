"""MONAI's ``LoadImage`` built without the nvImageCodec noise."""

from __future__ import annotations

import logging
import warnings

from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage


def quiet_load_image(reader: ImageReader, **kwargs) -> LoadImage:
    """``LoadImage(reader=reader, **kwargs)``, silencing the nvImageCodec warnings its construction emits.

    LoadImage instantiates every registered MONAI reader, the nvImageCodec DICOM reader included, which
    warns through logging and ``warnings`` wherever nvImageCodec and a GPU are absent; our loaders use one
    explicit reader, so that warning is noise. Build once per process and reuse.
    """
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_logger.level
    plugin_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return LoadImage(reader=reader, **kwargs)
    finally:
        plugin_logger.setLevel(level)
