"""What a run reads and writes: the CT series (or volumes, or images) of an input and where each result goes.

A *job* is one dictionary per series, volume or image, the item the bundles' evaluator gets from its
dataset: ``{"image": <what LoadCTd/LoadImaged reads>, "output": <where SaveCTd/SaveImaged writes>, ...}``.
Planning reads every DICOM header once (the loader decodes the pixels from those same headers) and checks
every output before anything is computed: the layout (:func:`plan_outputs`), that no output is, contains or
lies inside its input, and that existing outputs are replaced only when asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.dicom_series import DicomSeries, scan_dicom, select_series
from ldct_clip.io.images import IMAGE_SUFFIXES, list_images
from ldct_clip.io.load import nifti_shape, sniff_format
from ldct_clip.io.preflight import check_output, check_readable, dicom_series_bytes, nifti_bytes
from ldct_clip.io.staging import check_output_path

__all__ = [
    "DICOM_SUBDIR",
    "NIFTI_NAME",
    "OUTPUT_FORMATS",
    "check_outputs",
    "plan_ct_jobs",
    "image_output_folder",
    "plan_image_jobs",
    "plan_outputs",
]

OUTPUT_FORMATS = ("auto", "dicom", "nifti", "both")
#: File name of the NIfTI output when the output path is a folder.
NIFTI_NAME = "denoised.nii.gz"
#: Sub-folder of the DICOM series when both formats are written.
DICOM_SUBDIR = "dicom"


def plan_outputs(output: str | os.PathLike, output_format: str, source_kind: str) -> dict[str, Path]:
    """Where each output goes: ``{"dicom": folder, "nifti": file}`` (only the formats written).

    - ``"dicom"``: the derived series' files directly in ``output`` (a folder);
    - ``"nifti"``: ``output`` itself if it ends in ``.nii``/``.nii.gz``, else ``output/denoised.nii.gz``;
    - ``"both"``: ``output/dicom/`` and ``output/denoised.nii.gz``;
    - ``"auto"``: ``"dicom"`` for a DICOM input, ``"nifti"`` otherwise.

    Args:
        output: the output path given by the user.
        output_format: one of :data:`OUTPUT_FORMATS`.
        source_kind: ``"dicom"``, ``"nifti"`` or ``"itk"`` (what the input's content is).

    Raises:
        InputError: unknown format, or DICOM output asked for a non-DICOM input.
    """
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "auto":
        output_format = "dicom" if source_kind == "dicom" else "nifti"
    if output_format in ("dicom", "both") and source_kind != "dicom":
        raise InputError(
            f"DICOM output needs a DICOM series as input (the derived series takes its patient and study "
            f"from it), this input is {source_kind}: use --format nifti"
        )
    output = Path(output)
    is_nifti_path = output.name.endswith((".nii", ".nii.gz"))
    if output_format == "nifti":
        return {"nifti": output if is_nifti_path else output / NIFTI_NAME}
    if is_nifti_path:
        raise InputError(
            f"{output} is a NIfTI file name but {output_format} output needs a folder: drop the suffix"
        )
    if output_format == "dicom":
        return {"dicom": output}
    return {"dicom": output / DICOM_SUBDIR, "nifti": output / NIFTI_NAME}


def check_outputs(
    source: str | os.PathLike,
    output: str | os.PathLike,
    output_format: str,
    source_kind: str,
    overwrite: bool,
    shape: tuple[int, int, int] | None = None,
) -> dict[str, Path]:
    """Check, before anything is computed or written, that the outputs may be written; return the plan.

    Args:
        source: the input file or folder (outputs must not be it, lie inside it or contain it).
        output, output_format, source_kind: see :func:`plan_outputs`.
        overwrite: whether existing outputs that ldct-clip wrote may be replaced (never anything else).
        shape: the volume's (X, Y, Z), to check that each destination is writable and has room.

    Raises:
        InputError: see :func:`plan_outputs`.
        OutputError: an output is the input, lies inside or contains it, exists without ``overwrite``, is
            not an unchanged ldct-clip output, or its destination is not writable or has no room.
    """
    targets = plan_outputs(output, output_format, source_kind)
    sizes = {
        "dicom": dicom_series_bytes(shape[2], shape[1], shape[0]) if shape else None,
        "nifti": nifti_bytes(shape) if shape else None,
    }
    if len(targets) > 1:  # both formats go into one folder, written as a whole
        needed = sum(sizes.values()) if shape else None
        check_output(source, output, overwrite, needed_bytes=needed, is_dir=True)
    else:
        ((kind, target),) = targets.items()
        check_output(source, target, overwrite, needed_bytes=sizes[kind], is_dir=kind == "dicom")
    return targets


def source_kind(path: Path) -> str:
    """``"dicom"``, ``"nifti"`` or ``"itk"``: what a CT input file or folder holds (by content, not name)."""
    kind = sniff_format(path)
    if kind is None:
        raise InputError(
            f"{path} is neither DICOM (no 'DICM' preamble) nor NIfTI nor ITK (MetaImage, NRRD); "
            "convert it to one of those"
        )
    return kind


def _volume_shape(image: DicomSeries | Path, kind: str) -> tuple[int, int, int]:
    """(X, Y, Z) of an input, from its headers only."""
    if isinstance(image, DicomSeries):
        first = image.headers[0].dataset
        return int(first.Columns), int(first.Rows), image.n_slices
    if kind == "nifti":
        shape = nifti_shape(image)
    else:
        import SimpleITK as sitk  # here: ~100 MB resident that DICOM and NIfTI runs never need

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        reader.ReadImageInformation()
        shape = tuple(int(s) for s in reader.GetSize())
    shape = shape[:3]
    return (*shape, *([1] * (3 - len(shape))))


def _job(image: DicomSeries | Path, source: Path, output: Path, output_format: str, overwrite: bool) -> dict:
    kind = "dicom" if isinstance(image, DicomSeries) else source_kind(source)
    check_outputs(source, output, output_format, kind, overwrite, _volume_shape(image, kind))
    return {
        "image": image,
        "series": image if isinstance(image, DicomSeries) else None,
        "source": str(source),
        "series_uid": image.uid if isinstance(image, DicomSeries) else None,
        "output": str(output),
        "output_format": output_format,
        "skipped": image.skipped if isinstance(image, DicomSeries) else "",
    }


def plan_ct_jobs(
    input: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    output_format: str = "auto",
    series_uid: str | None = None,
    recursive: bool = False,
    include_derived: bool = False,
    overwrite: bool = False,
    errors: str = "raise",
) -> list[dict]:
    """The jobs of a CT run: one per series (``recursive``: every CT series under ``input``), checked.

    Args:
        input: a DICOM series folder or file, a NIfTI or ITK volume; with ``recursive``, a folder searched
            for every CT series.
        output: the output path (``recursive``: the folder that gets one sub-folder per series, mirroring
            the input tree, with the SeriesInstanceUID added where a folder holds several series).
        output_format: one of :data:`OUTPUT_FORMATS`.
        series_uid: the series to take when ``input`` holds several.
        recursive: every CT series under ``input``.
        include_derived: also the series ldct-clip itself denoised (left out by default, so that a folder
            of inputs and outputs is not denoised twice).
        overwrite: whether existing outputs may be replaced.
        errors: ``"raise"``: the first series that cannot be done stops the planning; ``"collect"`` (with
            ``recursive``): it becomes a job ``{"source", "error"}`` and the others go on.

    Raises:
        InputError: a missing input, no CT series, an unusable option combination.
        OutputError: an output that may not be written (see :func:`check_outputs`).
    """
    if input is None or str(input) == "":
        raise InputError("no input given: pass a DICOM series folder or file, a NIfTI or .mha/.nrrd volume")
    root = Path(input).expanduser()
    if not root.exists():
        raise InputError(f"input {root} does not exist; check the path")
    check_readable(root)
    if recursive and series_uid:
        raise InputError("--series-uid and --recursive exclude each other: drop one")
    if not recursive:
        if root.is_dir() or sniff_format(root) == "dicom":
            image: DicomSeries | Path = select_series(root, series_uid, include_derived=include_derived)
        else:
            image = root
        return [_job(image, root, Path(output), output_format, overwrite)]
    if not root.is_dir():
        raise InputError(f"--recursive needs a folder, {root} is a file: drop --recursive")
    # outputs inside the searched tree would be found as inputs by the next run
    check_output_path(root, output, overwrite=True)
    scan = scan_dicom(root, include_derived)
    series = sorted((s for s in scan.series if s.modality == "CT"), key=lambda s: (str(s.path), s.uid))
    if not series:
        raise InputError(
            f"no CT series found under {root}: check the folder, or drop --recursive for a single file"
        )
    per_folder: dict[Path, int] = {}
    for s in series:
        per_folder[Path(s.path)] = per_folder.get(Path(s.path), 0) + 1
    jobs = []
    for s in series:
        folder = Path(s.path)
        relative = folder.relative_to(root) if folder != root and folder.is_relative_to(root) else Path()
        out = Path(output) / relative
        if per_folder[folder] > 1:
            out = out / s.uid
        try:
            jobs.append(_job(s, folder, out, output_format, overwrite))
        except (InputError, OutputError) as error:
            if errors != "collect":
                raise
            jobs.append({"source": str(folder), "series_uid": s.uid, "error": str(error)})
    return jobs


def image_output_folder(input: str | os.PathLike | None, output: str | os.PathLike) -> Path | None:
    """The folder an image run writes as one output (a folder of images in), or None: one image file in and
    an image file out (written on its own with its sidecar), or no input (images given in memory)."""
    if input is None or str(input) == "":
        return None
    if Path(input).is_file() and Path(output).suffix.lower() in IMAGE_SUFFIXES:
        return None
    return Path(output)


def plan_image_jobs(
    input: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    suffix: str | None = None,
) -> list[dict]:
    """The jobs of an image run: one per image file, each with its output file; checked before any work.

    One input image and an ``output`` ending in an image suffix: that file. Otherwise ``output`` is a folder
    (:func:`image_output_folder`, written as one output: all images or none) that gets each image under its
    own name (its suffix replaced by ``suffix`` when given).

    Raises:
        InputError: no images, or an unknown ``suffix``.
        OutputError: the output would replace an input, lie inside the input folder, or replace an
            existing file without ``overwrite``.
    """
    if input is None or str(input) == "":
        raise InputError("no input given: pass an image file or a folder of images (bundle: --input PATH)")
    files = list_images(input)
    output = Path(output)
    if suffix is not None:
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        if suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"output suffix {suffix} is not an image type: use one of {', '.join(IMAGE_SUFFIXES)}"
            )
    if image_output_folder(input, output) is None:
        check_output(input, output, overwrite, is_dir=False)
        return [{"image": str(files[0]), "output": str(output)}]
    if Path(input).is_dir():
        check_output_path(input, output, overwrite=True)
    check_output(input, output, overwrite, is_dir=True)
    plan = [(f, output / (f.name if suffix is None else f.stem + suffix)) for f in files]
    names = [dst.name for _, dst in plan]
    if len(set(names)) != len(names):
        raise OutputError(
            f"two inputs would be written to the same file in {output}: keep the input suffixes"
        )
    return [{"image": str(src), "output": str(dst)} for src, dst in plan]
