"""Classic DICOM networking (pynetdicom): a C-STORE SCP that spools what it receives, and a C-STORE SCU.

The SCP writes every received instance to disk, grouped by series, *before* it acknowledges it: an
acknowledged instance survives a crash or a restart of the process and is picked up by the next run
(:meth:`SeriesSpool.recover`). Instances still in transfer when the process stops were never acknowledged,
so the sender knows to send them again.

Spool layout (``SPOOL/``)::

    incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received, series still gathering
    work/<SeriesInstanceUID>/                           taken for processing
    failed/<SeriesInstanceUID>-<time>/                  processing failed; kept for a look
    partial/                                            instances being written (not yet acknowledged)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import Verification

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.dicom_series import is_dicom_file

__all__ = ["DicomAddress", "SeriesSpool", "StorageSCP", "parse_dicom_address", "send_folder"]

logger = logging.getLogger(__name__)

#: DIMSE status codes (PS3.4 Annex B) the SCP answers with.
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: C-STORE statuses that mean "stored" (success and the three warnings of PS3.4 B.2.3).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: Presentation contexts one association can request (PS3.8: odd context IDs 1..255).
MAX_CONTEXTS = 128

# UIDs become file and folder names: only what a UID may hold (plus letters of non-conformant senders).
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.\-]{0,63}$")


@dataclass(frozen=True)
class DicomAddress:
    """A DICOM application entity: ``ae_title@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_dicom_address(text: str) -> DicomAddress:
    """Parse ``AET@HOST:PORT`` (an IPv6 host in brackets: ``AET@[::1]:104``).

    Raises:
        InputError: not of that form, an AE title over 16 characters, or a port outside 1..65535.
    """
    ae_title, at, rest = str(text).partition("@")
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    valid_ae = 0 < len(ae_title.strip()) <= 16 and "\\" not in ae_title
    if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536 and valid_ae):
        raise InputError(
            f"{text!r} is not a DICOM address: give AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242 "
            "(AE title of 1 to 16 characters)"
        )
    return DicomAddress(ae_title.strip(), host, int(port))


class SeriesSpool:
    """Received instances on disk, grouped by series, with the time each series last grew.

    Thread-safe: the SCP adds from its association threads while the listener takes series.

    Args:
        root: the spool folder (created).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.incoming, self.work, self.failed, self.partial = (
            self.root / name for name in ("incoming", "work", "failed", "partial")
        )
        for folder in (self.incoming, self.work, self.failed, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._last_arrival: dict[str, float] = {}

    def recover(self) -> int:
        """Take up what a previous run left: series it was working on go back to ``incoming``; every
        series there waits a full series timeout from now. Returns the number of series waiting."""
        with self._lock:
            shutil.rmtree(self.partial, ignore_errors=True)  # never acknowledged: the sender resends
            self.partial.mkdir(parents=True, exist_ok=True)
            for folder in sorted(self.work.iterdir()):
                self._merge(folder, self.incoming / folder.name)
            now = time.monotonic()
            self._last_arrival = {
                folder.name: now for folder in sorted(self.incoming.iterdir()) if folder.is_dir()
            }
            return len(self._last_arrival)

    def add(self, series_uid: str, sop_uid: str, encoded: bytes) -> Path:
        """Write one instance (a Part-10 byte string) durably into its series folder; return its path.

        Raises:
            ValueError: a UID that cannot be a file name.
        """
        for uid in (series_uid, sop_uid):
            if not _SAFE_UID.match(uid):
                raise ValueError(f"UID {uid!r} cannot name a file")
        staging = self.partial / f"{uuid.uuid4().hex}.dcm"
        with open(staging, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())  # on disk before the sender is told it is stored
        with self._lock:  # the series folder must not be taken between mkdir and rename
            folder = self.incoming / series_uid
            folder.mkdir(exist_ok=True)
            target = folder / f"{sop_uid}.dcm"
            os.replace(staging, target)
            self._last_arrival[series_uid] = time.monotonic()
        return target

    def quiet_series(self, quiet_seconds: float) -> list[str]:
        """Series to which nothing was added for ``quiet_seconds``, oldest first."""
        now = time.monotonic()
        with self._lock:
            ready = [(t, uid) for uid, t in self._last_arrival.items() if now - t >= quiet_seconds]
        return [uid for _, uid in sorted(ready)]

    def take(self, series_uid: str) -> Path:
        """Move a gathered series to ``work/`` (instances arriving later start a new batch); return it."""
        with self._lock:
            self._last_arrival.pop(series_uid, None)
            return self._merge(self.incoming / series_uid, self.work / series_uid)

    def done(self, folder: Path) -> None:
        """Forget a series that was processed and forwarded."""
        shutil.rmtree(folder, ignore_errors=True)

    def set_aside(self, folder: Path) -> Path:
        """Keep a series whose processing failed under ``failed/``; return where it went."""
        target = self.failed / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        return self._merge(folder, target)

    def waiting(self) -> int:
        """Series received and not yet taken."""
        with self._lock:
            return len(self._last_arrival)

    @staticmethod
    def _merge(source: Path, target: Path) -> Path:
        if not target.exists():
            os.replace(source, target)
            return target
        for path in source.iterdir():
            os.replace(path, target / path.name)
        source.rmdir()
        return target


class StorageSCP:
    """A C-STORE SCP (and C-ECHO) that spools each instance before acknowledging it.

    Args:
        spool: where received instances go.
        ae_title: this application entity's title.
        port: TCP port to listen on.
        host: interface to listen on (default: all).
    """

    def __init__(
        self, spool: SeriesSpool, ae_title: str = "LDCTCLIP", port: int = 11112, host: str = ""
    ) -> None:
        self.spool = spool
        self.address = (host, int(port))
        self.ae = AE(ae_title=ae_title)
        # every storage SOP class in any transfer syntax: instances are spooled as received, and the
        # DICOM reader (pydicom + pylibjpeg) decodes compressed ones later
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server = None

    def start(self) -> None:
        """Listen in background threads.

        Raises:
            InputError: the port cannot be bound (taken, or below 1024 without the right).
        """
        try:
            self._server = self.ae.start_server(
                self.address, block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as error:
            raise InputError(
                f"cannot listen on port {self.address[1]} ({error.strerror}): choose another --port"
            ) from None

    def stop(self) -> None:
        """Stop listening and end the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        try:
            dataset = event.dataset
            series_uid, sop_uid = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
        except Exception as error:  # whatever the peer sent, the association must get an answer
            logger.warning("refused an instance without readable UIDs: %s", error)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self.spool.add(series_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except ValueError as error:
            logger.warning("refused instance %s: %s", sop_uid, error)
            return STATUS_CANNOT_UNDERSTAND
        except OSError as error:
            logger.error("cannot spool instance %s: %s", sop_uid, error)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_dicom_file(p))


def _contexts(files: list[Path]) -> list:
    """Presentation contexts for the SOP classes of ``files``, each in its own and the uncompressed syntaxes."""
    syntaxes: dict[str, list[str]] = {}
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        wanted = syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), [])
        for syntax in (str(meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in wanted:
                wanted.append(syntax)
    if len(syntaxes) > MAX_CONTEXTS:
        raise OutputError(f"{len(syntaxes)} SOP classes do not fit one association; send fewer at a time")
    return [build_context(sop_class, wanted) for sop_class, wanted in syntaxes.items()]


def send_folder(
    folder: str | os.PathLike,
    destination: DicomAddress | str,
    *,
    calling_ae: str = "LDCTCLIP",
    timeout: float = 30.0,
    retries: int = 2,
) -> int:
    """C-STORE every DICOM file under ``folder`` to ``destination``; return how many were stored.

    A lost association is opened again (``retries`` times) and the sending goes on where it stopped.
    C-STORE cannot delete what was stored, so a failure in the middle says how much is left at the
    destination.

    Args:
        folder: a finished series folder (non-DICOM files in it are skipped).
        destination: ``DicomAddress`` or ``AET@HOST:PORT``.
        calling_ae: this side's AE title.
        timeout: seconds for the association and for each answer.
        retries: new associations tried after one was refused or lost.

    Raises:
        OutputError: nothing to send, the destination refuses the association or an instance, or the
            connection is lost more than ``retries`` times; the one line says how many were stored.
    """
    address = parse_dicom_address(destination) if isinstance(destination, str) else destination
    files = _dicom_files(Path(folder))
    if not files:
        raise OutputError(f"{folder} holds no DICOM file to send")
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = _contexts(files)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    stored, failures = 0, 0
    while stored < len(files):
        assoc = ae.associate(address.host, address.port, ae_title=address.ae_title)
        if not assoc.is_established:
            failures += 1
            reason = "association rejected" if assoc.is_rejected else "no association (down or unreachable)"
            if failures > retries:
                raise OutputError(_partial(address, stored, len(files), reason))
            time.sleep(0.5 * failures)
            continue
        try:
            for path in files[stored:]:
                try:
                    status = assoc.send_c_store(pydicom.dcmread(path))
                except RuntimeError:  # pynetdicom: the association ended under us
                    break
                code = getattr(status, "Status", None)
                if code is None:  # no answer: the association was lost
                    break
                if code not in STORED_STATUSES:
                    raise OutputError(
                        _partial(address, stored, len(files), f"{path.name} refused (status 0x{code:04X})")
                    )
                stored += 1
        finally:
            assoc.release()
        if stored < len(files):
            failures += 1
            if failures > retries:
                raise OutputError(_partial(address, stored, len(files), "association lost"))
    return stored


def _partial(address: DicomAddress, stored: int, total: int, reason: str) -> str:
    left = (
        "nothing is left there"
        if stored == 0
        else f"the {stored} stored instances are left there (C-STORE cannot delete them)"
    )
    return f"C-STORE to {address} failed after {stored} of {total} instances: {reason}; {left}"
