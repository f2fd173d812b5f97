"""CT volume I/O: DICOM series / NIfTI / ITK in (HU MetaTensor), derived DICOM series / NIfTI out, atomically."""

from ldct_clip.io.atomic import atomic_output as atomic_output
from ldct_clip.io.atomic import check_output_path as check_output_path
from ldct_clip.io.dicom_series import DicomSeries as DicomSeries
from ldct_clip.io.dicom_series import find_ct_series as find_ct_series
from ldct_clip.io.dicom_series import find_dicom_series as find_dicom_series
from ldct_clip.io.dicom_writer import SERIES_NUMBER_OFFSET as SERIES_NUMBER_OFFSET
from ldct_clip.io.dicom_writer import save_dicom_series as save_dicom_series
from ldct_clip.io.images import list_images as list_images
from ldct_clip.io.images import load_image as load_image
from ldct_clip.io.images import save_image as save_image
from ldct_clip.io.load import load_ct as load_ct
from ldct_clip.io.nifti import save_nifti as save_nifti
