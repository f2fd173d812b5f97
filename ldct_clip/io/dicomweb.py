"""DICOMweb source and sink: WADO-RS of a CT series into a folder, QIDO-RS of a study's CT series, STOW-RS
of a finished derived series into the same study.

The network is a loader and a writer of the one pipeline: :func:`fetch_series` fills a local folder that
the normal DICOM reader takes, and :func:`store_series` sends the folder the normal DICOM writer published,
only after every slice is denoised. Every failure a user can fix is one line (``InputError`` on the source
side, ``OutputError`` on the destination side); a STOW that fails in the middle is rolled back where the
server allows it (Orthanc's REST API) and says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.dicom_series import is_dicom_file
from ldct_clip.io.dicomweb_connection import (
    DEFAULT_TIMEOUT,
    DicomWebAuth,
    DicomWebURL,
    describe_request_error,
    is_dicomweb_url,
    make_client,
    one_line_errors,
    parse_auth,
    parse_dicomweb_url,
)
from ldct_clip.io.provenance import is_denoising_contribution

__all__ = [
    "DEFAULT_TIMEOUT",
    "DicomWebAuth",
    "DicomWebURL",
    "StoreReport",
    "check_store_target",
    "fetch_series",
    "is_dicomweb_url",
    "list_ct_series",
    "parse_auth",
    "parse_dicomweb_url",
    "store_series",
]

#: HTTP answers worth another try: the server or a proxy is busy or restarting, not refusing.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})

# Tags of QIDO-RS answers (DICOM JSON keys).
_MODALITY, _SERIES_UID, _SOP_UID, _N_INSTANCES = "00080060", "0020000E", "00080018", "00201209"


def _series_entries(client: DICOMwebClient, study_uid: str, **filters) -> list[dict]:
    return client.search_for_series(
        study_uid,
        fields=["Modality", "NumberOfSeriesRelatedInstances"],
        search_filters=filters,
        get_remaining=True,
    )


def _value(entry: dict, tag: str, default=None):
    values = entry.get(tag, {}).get("Value") or [default]
    return values[0]


def fetch_series(
    url: str, dest: str | os.PathLike, auth: DicomWebAuth | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> Path:
    """Download every instance of a CT series (WADO-RS) into ``dest``, one file per instance.

    The series is looked up first (QIDO-RS): a wrong URL, a missing series or a non-CT series is refused
    before anything is downloaded. Instances keep their transfer syntax (the DICOM reader decodes it).

    Args:
        url: ``http(s)://HOST[:PORT]/PREFIX/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}``.
        dest: folder to fill (created; usually an empty temporary folder).
        auth: credentials and TLS policy (default: anonymous, certificates verified).
        timeout: seconds to wait for a connection or for the next bytes of an answer.

    Returns:
        ``dest``.

    Raises:
        InputError: server down, wrong URL (404), 401/403, series not found, not CT, timeout, incomplete.
    """
    location = parse_dicomweb_url(url)
    if location.series_uid is None:
        raise InputError(
            f"{url} names no series: give .../studies/UID/series/UID (or a study URL with --recursive)"
        )
    auth = auth or DicomWebAuth()
    client = make_client(location, auth, timeout)
    with one_line_errors(location, timeout, InputError):
        try:
            entries = _series_entries(client, location.study_uid, SeriesInstanceUID=location.series_uid)
        except requests.exceptions.HTTPError as error:
            _raise_not_found_if_service_answers(client, location, timeout, error)
        if not entries:
            raise InputError(
                f"series {location.series_uid} not found in study {location.study_uid} at {location.root}"
            )
        modality = _value(entries[0], _MODALITY, "unknown")
        expected = _value(entries[0], _N_INSTANCES)
        if modality != "CT":
            raise InputError(f"series {location.series_uid} is {modality}, not CT: give a CT series URL")
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        received = 0
        for ds in client.iter_series(
            location.study_uid, location.series_uid, media_types=(("application/dicom", "*"),)
        ):
            if ds.get("Modality") != "CT":
                raise InputError(
                    f"series {location.series_uid} holds a {ds.get('Modality')} instance, not CT"
                )
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            received += 1
    if received == 0 or (expected is not None and received != int(expected)):
        raise InputError(
            f"received {received} of {expected or 'some'} instances of series {location.series_uid} from "
            f"{location.root}: retry, or check the server's log"
        )
    return folder


def _raise_not_found_if_service_answers(client, location: DicomWebURL, timeout: float, error) -> None:
    """A 404 of a study's series: 'not found' if the service answers at the root, else a wrong prefix."""
    message, status = describe_request_error(error, location, timeout)
    if status == 404:
        try:
            client.search_for_studies(limit=1)
        except requests.exceptions.RequestException:
            raise InputError(message) from None
        raise InputError(f"study {location.study_uid} not found at {location.root}") from None
    raise error


def list_ct_series(
    study_url: str,
    auth: DicomWebAuth | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    include_derived: bool = False,
) -> list[str]:
    """The series URLs of every CT series of a study (QIDO-RS), in the server's order.

    Series ldct-clip itself denoised (stored back by an earlier run) are left out unless
    ``include_derived``, as the local ``--recursive`` leaves them out.

    Raises:
        InputError: the URL names no study, the study is not found or has no CT series, or a network error.
    """
    location = parse_dicomweb_url(study_url)
    if location.study_uid is None:
        raise InputError(f"{study_url} names no study: give .../studies/STUDY_UID with --recursive")
    client = make_client(location, auth or DicomWebAuth(), timeout)
    with one_line_errors(location, timeout, InputError):
        try:
            entries = _series_entries(client, location.study_uid)
        except requests.exceptions.HTTPError as error:
            _raise_not_found_if_service_answers(client, location, timeout, error)
    if not entries:
        raise InputError(f"study {location.study_uid} not found at {location.root}")
    uids = [_value(e, _SERIES_UID) for e in entries if _value(e, _MODALITY) == "CT"]
    if not uids:
        found = sorted({str(_value(e, _MODALITY, "unknown")) for e in entries})
        raise InputError(f"study {location.study_uid} holds no CT series (only {', '.join(found)})")
    if not include_derived:
        with one_line_errors(location, timeout, InputError):
            uids = [uid for uid in uids if not _denoised_by_ldct_clip(client, location.study_uid, uid)]
        if not uids:
            raise InputError(
                f"study {location.study_uid} holds only CT series that ldct-clip denoised; nothing to do"
            )
    return [str(DicomWebURL(location.root, location.study_uid, uid)) for uid in uids]


def _denoised_by_ldct_clip(client: DICOMwebClient, study_uid: str, series_uid: str) -> bool:
    """Whether a series is an ldct-clip output, from the metadata of its first instance (WADO-RS)."""
    instances = client.search_for_instances(study_uid, series_uid, limit=1)
    if not instances:
        return False
    metadata = client.retrieve_instance_metadata(study_uid, series_uid, _value(instances[0], _SOP_UID))
    header = pydicom.Dataset.from_json(metadata, bulk_data_uri_handler=lambda tag, vr, uri: None)
    return is_denoising_contribution(header)


def check_store_target(
    root_url: str, auth: DicomWebAuth | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> DicomWebURL:
    """Check, before any denoising, that ``root_url`` is a DICOMweb root that answers these credentials.

    Raises:
        OutputError: not a root URL (it names a study), server down, wrong prefix, 401/403, timeout.
    """
    try:
        location = parse_dicomweb_url(root_url)
    except InputError as error:
        raise OutputError(str(error)) from None
    if location.study_uid is not None:
        raise OutputError(
            f"{root_url} names a study: give the DICOMweb root (the series goes into its source's study)"
        )
    with one_line_errors(location, timeout, OutputError):
        make_client(location, auth or DicomWebAuth(), timeout).search_for_studies(limit=1)
    return location


@dataclass(frozen=True)
class StoreReport:
    """What :func:`store_series` stored: ``stored`` instances of ``series_uid`` in ``study_uid`` at ``root``."""

    root: str
    study_uid: str
    series_uid: str
    stored: int

    @property
    def url(self) -> str:
        return str(DicomWebURL(self.root, self.study_uid, self.series_uid))

    def __str__(self) -> str:
        return f"stored {self.stored} instances -> {self.url}"


def _series_files(folder: Path) -> tuple[list[Path], str, str]:
    # the DICOM files only: a manifest or a NIfTI written next to them is not for the PACS
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_dicom_file(p))
    if not files:
        raise OutputError(f"{folder} holds no DICOM file to store")
    uids = set()
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uids.add((str(header.StudyInstanceUID), str(header.SeriesInstanceUID)))
    if len(uids) != 1:
        raise OutputError(f"{folder} holds {len(uids)} series; store one derived series at a time")
    (study_uid, series_uid) = uids.pop()
    return files, study_uid, series_uid


def store_series(
    folder: str | os.PathLike,
    root_url: str,
    auth: DicomWebAuth | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 2,
    retry_wait: float = 0.5,
) -> StoreReport:
    """Store every instance of a finished derived series folder in its study at a DICOMweb root (STOW-RS).

    One instance per request, so that a failure in the middle knows what was stored. Transient errors
    (connection lost, timeout, HTTP 408/429/5xx) are retried ``retries`` times per instance, waiting
    ``retry_wait`` seconds, doubled each time. A series already on the server is refused before anything
    is sent, so that a rollback only ever deletes what this call stored.

    Args:
        folder: the derived series (one series, e.g. what the DICOM writer published).
        root_url: DICOMweb root ``http(s)://HOST[:PORT]/PREFIX``.
        auth: credentials and TLS policy (default: anonymous, certificates verified).
        timeout: seconds to wait for a connection or for the next bytes of an answer.
        retries, retry_wait: bounded retries of transient errors.

    Raises:
        OutputError: the target is unusable (see :func:`check_store_target`), the series is already there,
            or a failure in the middle: the one line says how many instances were stored and whether the
            partial series was deleted again (Orthanc) or is left on the server.
    """
    location = check_store_target(root_url, auth, timeout=timeout)
    auth = auth or DicomWebAuth()
    files, study_uid, series_uid = _series_files(Path(folder))
    client = make_client(location, auth, timeout)
    with one_line_errors(location, timeout, OutputError):
        if _series_entries(client, study_uid, SeriesInstanceUID=series_uid):
            raise OutputError(
                f"series {series_uid} is already at {location.root}: nothing stored (delete it there first)"
            )
    stored = 0
    try:
        for path in files:
            _with_retries(lambda p=path: _stow_one(client, p, study_uid), retries, retry_wait)
            stored += 1
        with one_line_errors(location, timeout, OutputError):
            on_server = _series_entries(client, study_uid, SeriesInstanceUID=series_uid)
        count = int(_value(on_server[0], _N_INSTANCES, 0)) if on_server else 0
        if count != len(files):
            raise _StowFailure(f"the server lists {count} instances of {len(files)} sent")
    except (_StowFailure, requests.exceptions.RequestException) as error:
        reason = (
            error.args[0]
            if isinstance(error, _StowFailure)
            else describe_request_error(error, location, timeout)[0]
        )
        undo = _roll_back(location, auth, series_uid, stored, timeout)
        raise OutputError(
            f"STOW-RS of series {series_uid} to {location.root} failed after {stored} of {len(files)} "
            f"instances: {reason}; {undo}"
        ) from None
    return StoreReport(location.root, study_uid, series_uid, stored)


class _StowFailure(Exception):
    """The server answered but did not store an instance (FailedSOPSequence, wrong count)."""


def _stow_one(client: DICOMwebClient, path: Path, study_uid: str) -> None:
    answer = client.store_instances([pydicom.dcmread(path)], study_instance_uid=study_uid)
    failed = answer.get("FailedSOPSequence") or []
    if failed:
        reason = failed[0].get("FailureReason", "unknown")
        raise _StowFailure(f"the server refused {path.name} (failure reason {reason})")


def _is_transient(error: Exception) -> bool:
    if isinstance(error, requests.exceptions.HTTPError):
        return getattr(error.response, "status_code", None) in TRANSIENT_HTTP
    return isinstance(
        error, requests.exceptions.ConnectionError | requests.exceptions.Timeout
    ) and not isinstance(error, requests.exceptions.SSLError)


def _with_retries(call: Callable[[], None], retries: int, wait: float) -> None:
    for attempt in range(retries + 1):
        try:
            return call()
        except requests.exceptions.RequestException as error:
            if attempt == retries or not _is_transient(error):
                raise
        time.sleep(wait * 2**attempt)


def _roll_back(
    location: DicomWebURL, auth: DicomWebAuth, series_uid: str, stored: int, timeout: float
) -> str:
    """Delete the partial series where the server is Orthanc; say what became of it, in a few words."""
    session = auth.session()
    left = f"the partial series may be left on the server: delete series {series_uid} there"
    for base in _orthanc_candidates(location.root):
        try:
            system = session.get(f"{base}/system", timeout=timeout)
            is_orthanc = system.status_code == 200 and "ApiVersion" in system.json()
        except (requests.exceptions.RequestException, ValueError):
            is_orthanc = False  # down, or not Orthanc: nothing we can delete through it
        if not is_orthanc:
            continue
        try:
            found = session.post(f"{base}/tools/lookup", data=series_uid, timeout=timeout)
            found.raise_for_status()
            ids = [item["ID"] for item in found.json() if item.get("Type") == "Series"]
            for orthanc_id in ids:
                session.delete(f"{base}/series/{orthanc_id}", timeout=timeout).raise_for_status()
        except (requests.exceptions.RequestException, ValueError) as error:
            return f"rolling back on Orthanc failed ({type(error).__name__}): {left}"
        return "deleted the partial series from Orthanc (nothing stored)" if ids else "nothing was stored"
    return "nothing was stored" if stored == 0 else left


def _orthanc_candidates(root: str) -> list[str]:
    """Where Orthanc's REST API would be: the DICOMweb root minus its ``/dicom-web``, and the host root."""
    parts = urlsplit(root)
    candidates = [f"{parts.scheme}://{parts.netloc}"]
    if parts.path.rstrip("/").endswith("/dicom-web"):
        candidates.insert(0, root.rstrip("/")[: -len("/dicom-web")])
    return list(dict.fromkeys(candidates))
