"""Synthetic anthropomorphic CT phantom (upper abdomen / lung base) in Hounsfield units.

Tests, the demo and the noise calibration need CT-like volumes without patient data: a body outline
with subcutaneous fat, a muscle wall, a liver-like organ with small low-contrast lesions, spleen,
aorta, spine and ribs, lung bases and air, optionally with the scanner's circular field of view
padded with -3024 HU. Anatomy varies smoothly from slice to slice and a little with the seed.

Array layout follows :func:`ldct_clip.io.load_ct`: ``(1, X, Y, Z)`` with X along the image columns
(towards the patient's left), Y along the rows (towards posterior), Z towards superior; the affine is
MONAI's RAS convention, the DICOM orientation is the standard axial ``[1,0,0,0,1,0]``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy.ndimage import gaussian_filter

from ldct_clip.io.dicom_writer import encode_pixels, write_dataset
from ldct_clip.io.nifti import save_nifti
from ldct_clip.io.provenance import Provenance
from ldct_clip.io.staging import fault_point, staged_output

__all__ = [
    "AIR_HU",
    "FOV_PADDING_HU",
    "TISSUE_HU",
    "make_phantom",
    "make_water_cylinder",
    "phantom_affine",
    "write_phantom_dicom",
    "write_phantom_nifti",
]

AIR_HU = -1000.0
FOV_PADDING_HU = -3024.0
TISSUE_HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "soft_tissue": 30.0,
    "muscle": 45.0,
    "blood": 40.0,
    "spleen": 50.0,
    "liver": 60.0,
    "lesion": 75.0,  # +15 HU against liver: a low-contrast detectability target
    "csf": 10.0,
    "cancellous_bone": 300.0,
    "cortical_bone": 1000.0,
    "rib": 750.0,
}


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit) with as many digits as fit."""
    return format_number_as_ds(float(value))


def phantom_affine(size: int | Sequence[int], spacing: Sequence[float], slices: int) -> np.ndarray:
    """RAS affine of a phantom of ``size`` pixels, centred on the isocentre in x/y, standard axial orientation."""
    nx, ny = (size, size) if isinstance(size, int) else tuple(size)
    dx, dy, dz = (float(s) for s in spacing)
    # LPS position of voxel (0, 0, 0) such that the volume is centred on (0, 0, 0).
    origin_lps = np.array([-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -(slices - 1) * dz / 2])
    lps = np.diag([dx, dy, dz, 1.0])
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, angle: float = 0.0):
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    ru, rv = c * du + s * dv, -s * du + c * dv
    return (ru / au) ** 2 + (rv / av) ** 2 <= 1.0


def _slice(u: np.ndarray, v: np.ndarray, t: float, anatomy: dict) -> np.ndarray:
    """One axial slice at relative height ``t`` in [0, 1] (0 inferior, 1 superior), HU."""
    img = np.full(u.shape, TISSUE_HU["air"], dtype=np.float32)
    bw = anatomy["body_a"] * (1.0 + 0.02 * np.sin(2 * np.pi * t))
    bh = anatomy["body_b"] * (1.0 + 0.015 * np.cos(2 * np.pi * t))
    body = _ellipse(u, v, 0.0, 0.02, bw, bh)
    img[body] = TISSUE_HU["fat"]
    wall = _ellipse(u, v, 0.0, 0.02, bw - 0.06, bh - 0.05)
    img[wall] = TISSUE_HU["muscle"]
    cavity = _ellipse(u, v, 0.0, 0.03, bw - 0.11, bh - 0.09)
    img[cavity] = TISSUE_HU["soft_tissue"]
    for cu, cv, r in anatomy["fat_blobs"]:
        img[cavity & _ellipse(u, v, cu, cv, r, 0.8 * r)] = TISSUE_HU["fat"]

    # Lung bases grow towards superior, the liver dome shrinks: the usual upper-abdomen transition.
    lung_scale = 0.35 + 0.65 * t
    for side in (-1.0, 1.0):
        lung = _ellipse(u, v, side * 0.36, 0.05, 0.22 * lung_scale, 0.30 * lung_scale, side * 0.15)
        img[cavity & lung] = TISSUE_HU["lung"]

    liver_scale = 1.0 - 0.35 * t
    liver = cavity & _ellipse(u, v, anatomy["liver_cu"], 0.02, 0.30 * liver_scale, 0.30 * liver_scale, -0.35)
    img[liver] = TISSUE_HU["liver"]
    for cu, cv, r, tz in anatomy["lesions"]:
        # Spherical lesions: the in-plane radius follows the distance of this slice from the centre.
        rz = r * np.sqrt(max(0.0, 1.0 - ((t - tz) / 0.35) ** 2))
        if rz > 0.01:
            img[liver & _ellipse(u, v, cu, cv, rz, rz)] = TISSUE_HU["lesion"]

    img[cavity & _ellipse(u, v, 0.42, 0.15, 0.12, 0.08, 0.6)] = TISSUE_HU["spleen"]
    img[_ellipse(u, v, 0.07, 0.22, 0.045, 0.045)] = TISSUE_HU["blood"]  # aorta
    img[_ellipse(u, v, -0.07, 0.20, 0.05, 0.04)] = TISSUE_HU["blood"]  # vena cava

    # Spine: vertebral body (cortex + cancellous), canal with CSF, spinous process.
    img[_ellipse(u, v, 0.0, 0.36, 0.11, 0.09)] = TISSUE_HU["cortical_bone"]
    img[_ellipse(u, v, 0.0, 0.36, 0.075, 0.058)] = TISSUE_HU["cancellous_bone"]
    img[_ellipse(u, v, 0.0, 0.505, 0.05, 0.04)] = TISSUE_HU["cortical_bone"]
    img[_ellipse(u, v, 0.0, 0.505, 0.035, 0.028)] = TISSUE_HU["csf"]
    img[_ellipse(u, v, 0.0, 0.57, 0.035, 0.045)] = TISSUE_HU["cortical_bone"]
    for angle in anatomy["rib_angles"]:
        a = angle + 0.05 * np.sin(2 * np.pi * t)
        cu, cv = (bw - 0.085) * np.cos(a), 0.02 + (bh - 0.075) * np.sin(a)
        img[_ellipse(u, v, cu, cv, 0.035, 0.022, a + np.pi / 2)] = TISSUE_HU["rib"]
    return img


def _anatomy(rng: np.random.Generator) -> dict:
    return {
        "body_a": 0.86 * (1.0 + rng.uniform(-0.04, 0.04)),
        "body_b": 0.62 * (1.0 + rng.uniform(-0.04, 0.04)),
        "liver_cu": -0.33 + rng.uniform(-0.03, 0.03),
        "fat_blobs": [
            (rng.uniform(-0.1, 0.3), rng.uniform(-0.3, 0.1), rng.uniform(0.03, 0.06)) for _ in range(4)
        ],
        # (u, v, radius, relative height of the centre): within the liver's usual extent
        "lesions": [
            (-0.40 + rng.uniform(-0.04, 0.04), -0.05 + rng.uniform(-0.04, 0.04), 0.055, 0.3),
            (-0.25 + rng.uniform(-0.04, 0.04), 0.12 + rng.uniform(-0.03, 0.03), 0.04, 0.5),
            (-0.45 + rng.uniform(-0.03, 0.03), 0.15 + rng.uniform(-0.03, 0.03), 0.03, 0.2),
        ],
        "rib_angles": [
            a + rng.uniform(-0.05, 0.05) for a in np.deg2rad([200, 225, 250, 290, 315, 340, 160, 20])
        ],
    }


def make_phantom(
    size: int = 256,
    slices: int = 8,
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    seed: int = 0,
    fov_padding: bool = True,
    texture_hu: float = 4.0,
) -> MetaTensor:
    """Noise-free anthropomorphic CT volume.

    Args:
        size: in-plane matrix (square), pixels.
        slices: number of axial slices.
        spacing: voxel size (x, y, z) in mm; only the affine depends on it, the anatomy scales with the matrix.
        seed: anatomical variation (body size, lesion and rib positions, parenchymal texture).
        fov_padding: set the corners outside the circular reconstruction field of view to -3024 HU, as
            many scanners do.
        texture_hu: amplitude of a smooth, noise-free parenchymal texture inside the body (0 disables it).

    Returns:
        MetaTensor ``(1, size, size, slices)`` float32 HU with a RAS affine.
    """
    if size < 8 or slices < 1:
        raise ValueError(f"phantom needs size >= 8 and slices >= 1, got size={size}, slices={slices}")
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(rng)
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    u, v = np.meshgrid(coords, coords, indexing="ij")  # u along X (columns), v along Y (rows)
    vol = np.empty((size, size, slices), dtype=np.float32)
    texture = gaussian_filter(
        rng.standard_normal((size, size, slices)).astype(np.float32), (size / 64, size / 64, 1)
    )
    texture *= texture_hu / max(float(texture.std()), 1e-6)
    for k in range(slices):
        t = k / (slices - 1) if slices > 1 else 0.5
        img = _slice(u, v, t, anatomy)
        # Partial-volume edges as a scanner's reconstruction kernel gives them.
        img = gaussian_filter(img, 0.5)
        soft = (img > -200) & (img < 200)
        img[soft] += texture[..., k][soft]
        vol[..., k] = img
    if fov_padding:
        vol[u**2 + v**2 > 1.0] = FOV_PADDING_HU
    affine = phantom_affine(size, spacing, slices)
    return MetaTensor(torch.from_numpy(vol[None]), affine=torch.as_tensor(affine, dtype=torch.float64))


def make_water_cylinder(
    size: int = 256,
    slices: int = 4,
    diameter_mm: float = 160.0,
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    water_hu: float = 0.0,
) -> MetaTensor:
    """A water cylinder (0 HU disk) in air, the standard object for noise calibration.

    Args:
        size: in-plane matrix (square), pixels.
        slices: number of axial slices.
        diameter_mm: cylinder diameter; must fit the field of view (size * spacing).
        spacing: voxel size (x, y, z) in mm.
        water_hu: value inside the cylinder.

    Returns:
        MetaTensor ``(1, size, size, slices)`` float32 HU with a RAS affine.
    """
    dx, dy = float(spacing[0]), float(spacing[1])
    if diameter_mm > min(size * dx, size * dy):
        raise ValueError(f"diameter {diameter_mm} mm does not fit the {size * dx:.0f} mm field of view")
    x = (np.arange(size) - (size - 1) / 2) * dx
    y = (np.arange(size) - (size - 1) / 2) * dy
    xx, yy = np.meshgrid(x, y, indexing="ij")
    disk = np.where(xx**2 + yy**2 <= (diameter_mm / 2) ** 2, water_hu, AIR_HU).astype(np.float32)
    vol = np.repeat(disk[..., None], slices, axis=2)
    affine = phantom_affine(size, spacing, slices)
    return MetaTensor(torch.from_numpy(vol[None]), affine=torch.as_tensor(affine, dtype=torch.float64))


def write_phantom_dicom(
    output_dir: str | os.PathLike,
    size: int = 64,
    slices: int = 8,
    seed: int = 0,
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    fov_padding: bool = True,
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
    pixel_representation: int = 1,
    overwrite: bool = False,
    volume: MetaTensor | None = None,
    manifest: bool = True,
    **tags,
) -> Path:
    """Write a phantom as a valid classic CT Image Storage series, one file per slice.

    Stored values are ``HU + 1024`` (RescaleIntercept -1024, RescaleSlope 1), as most scanners store them.

    Args:
        output_dir: folder to create (staged and published whole with ``ldct-clip-manifest.json``; refused
            if it exists unless ``overwrite`` and it is an unchanged ldct-clip output).
        size, slices, seed, spacing, fov_padding: see :func:`make_phantom`.
        transfer_syntax: any syntax pydicom can write here: Explicit/Implicit VR Little Endian, Deflated
            Explicit VR Little Endian, RLE Lossless, JPEG 2000 Lossless (pylibjpeg-openjpeg).
        pixel_representation: 1 stores int16 (keeps -3024 HU padding), 0 stores uint16 (values below
            -1024 HU clip to stored 0, as with scanners storing unsigned data).
        overwrite: replace an existing ``output_dir``.
        volume: write this HU volume (``(1, X, Y, Z)`` with a RAS affine in the standard axial
            orientation, e.g. from :func:`make_phantom`) instead of generating one.
        tags: DICOM keywords to set on every slice (e.g. ``PatientName="X"``, ``SeriesDescription="Y"``);
            a value of ``None`` deletes the element (used to build invalid test inputs).
        manifest: write the manifest (False: the folder holds the DICOM files only, like a scanner export).

    Returns:
        the output folder.
    """

    vol = make_phantom(size, slices, spacing, seed, fov_padding) if volume is None else volume
    hu = np.asarray(vol.detach().cpu().numpy() if isinstance(vol, torch.Tensor) else vol, dtype=np.float32)[0]
    aff = np.asarray(
        vol.affine if isinstance(vol, MetaTensor) else phantom_affine(size, spacing, slices), float
    )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    spacing_xyz = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir = lps[:3, 0] / spacing_xyz[0]  # direction of increasing column index
    col_dir = lps[:3, 1] / spacing_xyz[1]  # direction of increasing row index
    nx, ny, nz = hu.shape

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()

    provenance = Provenance(task=f"synthetic phantom seed {seed}")
    with staged_output(
        output_dir, overwrite=overwrite, is_dir=True, provenance=provenance, manifest=manifest
    ) as tmp:
        for k in range(nz):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
            ds.AccessionNumber = ""
            ds.Modality = "CT"
            ds.Manufacturer = "ldct_clip synthetic phantom"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "Synthetic anthropomorphic phantom"
            ds.SeriesDescription = f"Phantom seed {seed}"
            ds.PatientName = "Phantom^Synthetic"
            ds.PatientID = f"LDCTCLIP-PHANTOM-{seed}"
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.BodyPartExamined = "ABDOMEN"
            ds.SliceThickness = _ds(spacing_xyz[2])
            ds.KVP = "120"
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = 1
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = k + 1
            position = lps[:3, 3] + k * lps[:3, 2]
            ds.ImagePositionPatient = [_ds(p) for p in position]
            ds.ImageOrientationPatient = [_ds(c) for c in (*row_dir, *col_dir)]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(position[2])
            ds.PixelSpacing = [
                _ds(spacing_xyz[1]),
                _ds(spacing_xyz[0]),
            ]  # row spacing, column spacing
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            if fov_padding and pixel_representation == 1:
                ds.add_new("PixelPaddingValue", "SS", int(FOV_PADDING_HU + 1024))
            encode_pixels(ds, hu[:, :, k].T, intercept=-1024.0, slope=1.0, signed=pixel_representation == 1)
            for keyword, value in tags.items():
                if value is None:
                    if keyword in ds:
                        delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            write_dataset(ds, tmp / f"CT{k + 1:04d}.dcm", transfer_syntax)
            fault_point("slice-written")
    return Path(output_dir)


def write_phantom_nifti(path: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
    """Write :func:`make_phantom` (``kwargs``) as a NIfTI file of int16 HU."""

    provenance = Provenance(task=f"synthetic phantom seed {kwargs.get('seed', 0)}")
    return save_nifti(make_phantom(**kwargs), path, overwrite=overwrite, provenance=provenance)
