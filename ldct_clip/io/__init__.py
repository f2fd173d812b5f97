"""CT volume I/O: DICOM series / NIfTI / ITK in (HU MetaTensor), derived DICOM series / NIfTI out.

Every output is staged and published atomically with a manifest of what ldct-clip wrote
(:mod:`ldct_clip.io.staging`, :mod:`ldct_clip.io.manifest`), carries its provenance
(:mod:`ldct_clip.io.provenance`), and can be checked before any work (:mod:`ldct_clip.io.preflight`).
"""

from ldct_clip.io.dicom_series import DicomScan as DicomScan
from ldct_clip.io.dicom_series import DicomSeries as DicomSeries
from ldct_clip.io.dicom_series import find_ct_series as find_ct_series
from ldct_clip.io.dicom_series import find_dicom_series as find_dicom_series
from ldct_clip.io.dicom_series import scan_dicom as scan_dicom
from ldct_clip.io.dicom_series import select_series as select_series
from ldct_clip.io.dicom_writer import SERIES_NUMBER_OFFSET as SERIES_NUMBER_OFFSET
from ldct_clip.io.dicom_writer import save_dicom_series as save_dicom_series
from ldct_clip.io.images import list_images as list_images
from ldct_clip.io.images import load_image as load_image
from ldct_clip.io.images import save_image as save_image
from ldct_clip.io.load import load_ct as load_ct
from ldct_clip.io.load import sniff_format as sniff_format
from ldct_clip.io.manifest import check_replaceable as check_replaceable
from ldct_clip.io.manifest import is_ldct_clip_output as is_ldct_clip_output
from ldct_clip.io.manifest import read_manifest as read_manifest
from ldct_clip.io.nifti import save_nifti as save_nifti
from ldct_clip.io.preflight import check_destination as check_destination
from ldct_clip.io.preflight import check_output as check_output
from ldct_clip.io.preflight import check_readable as check_readable
from ldct_clip.io.provenance import Provenance as Provenance
from ldct_clip.io.staging import check_output_path as check_output_path
from ldct_clip.io.staging import find_leftovers as find_leftovers
from ldct_clip.io.staging import install_signal_handlers as install_signal_handlers
from ldct_clip.io.staging import staged_output as staged_output
