"""Image files (PNG, JPEG, TIFF, BMP; 8- and 16-bit; grey and RGB) in and out, for the sRGB and synthetic tasks.

Images come back as channel-first ``(C, H, W)`` float32 :class:`monai.data.MetaTensor` in [0, 1] with the
file's bit depth in ``meta["bit_depth"]`` (8, 16, or 32 for floating-point TIFF), so that
:func:`save_image` writes the depth the image was read with.

Readers: MONAI's :class:`~monai.data.PILReader` for 8-bit files and 16-bit grey PNG. Pillow reads a 16-bit
colour PNG as 8 bits and MONAI's ITKReader needs the ``itk`` package (not a dependency of ours), so TIFF goes
through ``tifffile`` and 16-bit colour PNG through SimpleITK, both wrapped as a MONAI ``ImageReader`` so
that :class:`~monai.transforms.LoadImage` does the rest (meta data, channel first). Writers: MONAI's
:class:`~monai.data.PILWriter` where Pillow can hold the data, SimpleITK for 16-bit colour PNG, tifffile
for TIFF. Every write is staged and published with a sidecar manifest
(:func:`ldct_clip.io.staging.staged_output`), so that only ldct-clip's own unchanged files are replaced.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.data import ImageReader, MetaTensor, PILReader, PILWriter
from monai.transforms import LoadImage

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.monai_loader import quiet_load_image
from ldct_clip.io.provenance import Provenance
from ldct_clip.io.staging import fault_point, staged_output

__all__ = [
    "IMAGE_SUFFIXES",
    "HighDepthImageReader",
    "list_images",
    "load_image",
    "save_image",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_colour_16bit_png(path: Path) -> bool:
    """True for a PNG whose IHDR says 16 bits per sample and colour (types 2 RGB, 6 RGBA)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[24] == 16 and head[25] in (2, 6)


def _pil_to_supported_mode(image):
    """PILReader converter: palette, CMYK, alpha and 1-bit images become plain grey or RGB."""
    mode = image.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "RGBa"):
        return image.convert("RGB")
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    return image


class HighDepthImageReader(ImageReader):
    """MONAI image reader for what Pillow cannot read losslessly: TIFF (tifffile) and 16-bit colour PNG
    (SimpleITK). Arrays come out as (H, W) or (H, W, C) like ``PILReader(reverse_indexing=False)``; an
    alpha channel is dropped.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike | str) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(Path(n).suffix.lower() in _TIFF_SUFFIXES + (".png",) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike | str, **kwargs) -> list[np.ndarray]:
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        return [self._read_one(Path(n)) for n in names]

    @staticmethod
    def _read_one(path: Path) -> np.ndarray:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            array = np.asarray(tifffile.imread(path))
        else:
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey+alpha, RGB+alpha
            array = array[..., : array.shape[-1] - 1]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
            raise ValueError(f"expected a 2D grey or RGB image, found an array of shape {array.shape}")
        return array

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arrays = img if isinstance(img, list) else [img]
        array = arrays[0] if len(arrays) == 1 else np.stack(arrays)
        meta = {
            "spatial_shape": np.asarray(arrays[0].shape[:2]),
            "original_channel_dim": -1 if arrays[0].ndim == 3 else float("nan"),
        }
        return array, meta


_LOADERS: dict[str, LoadImage] = {}


def _loader_for(path: Path) -> LoadImage:
    """One cached LoadImage per reader: building LoadImage instantiates all of MONAI's readers."""
    suffix = path.suffix.lower()
    kind = "high" if suffix in _TIFF_SUFFIXES or (suffix == ".png" and _is_colour_16bit_png(path)) else "pil"
    if kind not in _LOADERS:
        reader: ImageReader = (
            HighDepthImageReader()
            if kind == "high"
            else PILReader(converter=_pil_to_supported_mode, reverse_indexing=False)
        )
        _LOADERS[kind] = quiet_load_image(reader, image_only=True, dtype=None, ensure_channel_first=True)
    return _LOADERS[kind]


def _bit_depth_and_scale(array: np.ndarray) -> tuple[int, float]:
    if array.dtype == np.uint8:
        return 8, 255.0
    if array.dtype == np.uint16:
        return 16, 65535.0
    if np.issubdtype(array.dtype, np.integer):  # Pillow "I" (int32) images hold 16-bit data
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"integer samples outside 0..65535 ({array.dtype})")
        return 16, 65535.0
    if np.issubdtype(array.dtype, np.floating):
        return 32, 1.0
    if array.dtype == bool:
        return 8, 1.0
    raise ValueError(f"unsupported sample type {array.dtype}")


def load_image(path: str | os.PathLike, channels: int | None = None) -> MetaTensor:
    """Load one image file as a channel-first float32 tensor in [0, 1].

    Args:
        path: a PNG, JPEG, TIFF or BMP file.
        channels: ``None`` keeps the file's channels; 3 repeats a grey image to RGB; 1 requires a grey
            image (a colour image is refused rather than silently converted).

    Returns:
        ``MetaTensor`` of shape (C, H, W), C in {1, 3}; ``meta["bit_depth"]`` is 8, 16 or 32 (float TIFF,
        values kept as stored) and ``meta["source_path"]`` the file.

    Raises:
        InputError: the file is missing, not an image, or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}; check the path")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)}); pass a PNG, JPEG or TIFF"
        )
    try:
        with warnings.catch_warnings():
            # PILReader hands LoadImage a read-only view; we copy it below, so torch's warning is noise
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            loaded = _loader_for(path)(str(path))
        array = np.asarray(loaded.array if isinstance(loaded, MetaTensor) else loaded)
        bit_depth, scale = _bit_depth_and_scale(array)
    except Exception as error:  # any decoder failure is the user's file, reported in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"cannot read image {path}: {reason}; check that it is a valid PNG, JPEG or TIFF file"
        ) from error
    if array.shape[0] not in (1, 3):
        raise InputError(
            f"{path} has {array.shape[0]} channels; only grey (1) and RGB (3) images are supported"
        )
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / np.float32(scale))
    if channels == 3 and data.shape[0] == 1:
        data = data.repeat(3, 1, 1)
    elif channels == 1 and data.shape[0] == 3:
        raise InputError(f"{path} is a colour image but a grey one is needed; convert it to greyscale first")
    elif channels not in (None, 1, 3):
        raise InputError(f"channels must be 1, 3 or None, got {channels}")
    meta = dict(loaded.meta) if isinstance(loaded, MetaTensor) else {}
    meta.update({"bit_depth": bit_depth, "source_path": str(path), "filename_or_obj": str(path)})
    return MetaTensor(data, meta=meta)


def list_images(path: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files of a folder, sorted by name (not recursive, hidden files skipped), or ``[path]``
    for a single image file.

    Args:
        path: a folder or one image file.
        suffixes: accepted file name endings, compared case-insensitively.

    Raises:
        InputError: the path does not exist, or holds no image with one of ``suffixes``.
    """
    path = Path(path)
    wanted = tuple(s.lower() for s in suffixes)
    if path.is_file():
        if path.suffix.lower() not in wanted:
            raise InputError(f"{path} is not an image file ({', '.join(wanted)}); pass an image or a folder")
        return [path]
    if not path.is_dir():
        raise InputError(f"image path not found: {path}; pass an existing image file or folder")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted
    )
    if not files:
        raise InputError(f"no image files ({', '.join(wanted)}) in folder {path}; check the folder")
    return files


def _quantise(data: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 32:
        return data.astype(np.float32)
    top = 255 if bit_depth == 8 else 65535
    # round, not truncate: x = k/255 read from a file must write back k (PILWriter's scaling truncates)
    return np.rint(np.clip(data.astype(np.float64), 0.0, 1.0) * top).astype(
        np.uint8 if bit_depth == 8 else np.uint16
    )


def _write_file(array_chw: np.ndarray, path: Path, quality: int) -> None:
    suffix = path.suffix.lower()
    hwc = np.moveaxis(array_chw, 0, -1)
    if suffix in _TIFF_SUFFIXES:
        channels = hwc.shape[-1]
        tifffile.imwrite(
            path, hwc if channels == 3 else hwc[..., 0], photometric="rgb" if channels == 3 else "minisblack"
        )
    elif array_chw.dtype == np.uint16 and array_chw.shape[0] == 3:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(hwc), isVector=True), str(path))
    else:
        writer = PILWriter(output_dtype=array_chw.dtype, channel_dim=0, scale=None)
        writer.set_data_array(array_chw, channel_dim=0)
        kwargs = {"quality": quality} if suffix in _JPEG_SUFFIXES else {}
        writer.write(str(path), reverse_indexing=False, **kwargs)


def save_image(
    image: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    bit_depth: int | None = None,
    overwrite: bool = False,
    quality: int = 95,
    provenance: Provenance | None = None,
    command: str = "",
    manifest: bool = True,
) -> Path:
    """Write a (C, H, W) image in [0, 1] (C in {1, 3}) to PNG, JPEG, TIFF or BMP, atomically.

    Values are clipped to [0, 1] and rounded to the bit depth.

    Args:
        image: (C, H, W) or (H, W) array or tensor; a ``MetaTensor`` carries its ``bit_depth``.
        path: output file; the suffix chooses the format.
        bit_depth: 8, 16 or 32 (float TIFF only). ``None``: the image's ``meta["bit_depth"]``, else 8.
            JPEG and BMP hold 8 bits: an image read at 16 bits is written at 8 unless 16 is asked for
            explicitly (an error).
        overwrite: replace an existing file if it is an unchanged ldct-clip output.
        quality: JPEG quality (1-95).
        provenance: what made the image, recorded in its sidecar ``<name>.ldct-clip.json``.
        command: the command line recorded in the sidecar (default: this process's).
        manifest: write the sidecar; False for an image that goes into a folder with its own manifest.

    Raises:
        OutputError: the file exists and ``overwrite`` is False, or the folder is not writable (a missing
            folder is created).
        InputError: the image shape or the bit depth does not fit the format.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"cannot write {path}: use one of {', '.join(IMAGE_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another name or allow overwriting")
    meta_depth = image.meta.get("bit_depth") if isinstance(image, MetaTensor) else None
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise InputError(
            f"cannot write an image of shape {tuple(array.shape)}: expected (C, H, W), C = 1 or 3"
        )
    eight_bit_only = suffix in _JPEG_SUFFIXES or suffix == ".bmp"
    if bit_depth is None:
        bit_depth = int(meta_depth) if meta_depth is not None else 8
        if eight_bit_only:
            bit_depth = 8
        elif bit_depth == 32 and suffix not in _TIFF_SUFFIXES:
            bit_depth = 16
    if bit_depth not in (8, 16, 32):
        raise InputError(f"bit depth must be 8, 16 or 32, got {bit_depth}")
    if (eight_bit_only and bit_depth != 8) or (bit_depth == 32 and suffix not in _TIFF_SUFFIXES):
        raise InputError(f"{suffix} files cannot hold {bit_depth}-bit samples; write .png or .tif instead")
    quantised = _quantise(array, bit_depth)
    try:
        with staged_output(
            path, overwrite=overwrite, provenance=provenance, command=command, manifest=manifest
        ) as tmp:
            _write_file(quantised, tmp, quality)
            fault_point("file-written")
    except OutputError:
        raise
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}; check the folder") from error
    return path
