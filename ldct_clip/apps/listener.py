"""The PACS listener (``ldct-clip listen``): receive CT series by C-STORE, denoise each, forward the result.

A :class:`~ldct_clip.io.dimse.StorageSCP` spools every received instance before acknowledging it. A
series is complete when no instance of it has arrived for ``series_timeout`` seconds; it is then denoised
through the bundle pipeline (the same one ``ldct-clip denoise`` runs) and the derived series, once every
slice is written, is C-STOREd to the forward destination. Series are processed one at a time in the
calling thread, while the SCP keeps receiving in its own threads. A series that fails is logged in one
line and set aside in ``SPOOL/failed/``; the listener goes on. On SIGTERM (or Ctrl-C) it stops receiving,
finishes the series in hand and exits; series still gathering stay in the spool for the next run.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pydicom

from ldct_clip.bundles import DEFAULT_CT_BUNDLE, BundlePipeline
from ldct_clip.errors import LdctClipError
from ldct_clip.io.dicom_series import is_dicom_file
from ldct_clip.io.dimse import DicomAddress, SeriesSpool, StorageSCP, parse_dicom_address, send_folder
from ldct_clip.io.jobs import plan_ct_jobs
from ldct_clip.io.provenance import is_denoising_contribution

__all__ = ["BundleDenoiser", "DenoiseFolder", "SeriesListener", "run_listener"]

#: ``denoise_folder(source_dir, output_dir) -> folder of the derived DICOM series``.
DenoiseFolder = Callable[[Path, Path], Path]


class BundleDenoiser:
    """Denoise a series folder into a derived DICOM series folder with the bundle pipeline, the route of
    ``ldct-clip denoise``: the bundle's ``inference.json`` with ``overrides``, one evaluator run per series,
    the weights read once for every series the listener receives.

    Args:
        bundle: bundle folder or shipped bundle name (None: the default CT bundle).
        overrides: bundle config overrides (``ckpt_path``, ``device``, ``batch_size``, ...).
    """

    def __init__(
        self, bundle: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
    ) -> None:
        self.bundle = bundle
        self.overrides = {"progress": False, **dict(overrides or {}), "jobs": []}  # jobs: one per call
        self._pipeline = None

    def load(self) -> None:
        """Build the pipeline and read the weights now (a bad bundle or weights file fails at start-up)."""
        if self._pipeline is None:
            pipeline = BundlePipeline(self.bundle or DEFAULT_CT_BUNDLE, overrides=self.overrides)
            pipeline.load_weights()
            self._pipeline = pipeline

    def __call__(self, source_dir: Path, output_dir: Path) -> Path:
        self.load()
        self._pipeline.run(plan_ct_jobs(source_dir, output_dir, output_format="dicom"))
        return Path(output_dir)


class SeriesListener:
    """Receive series, denoise each once it is complete, forward the derived series.

    Args:
        spool: spool folder (or a :class:`SeriesSpool`); what a previous run left there is taken up.
        forward: where derived series go (``AET@HOST:PORT`` or a :class:`DicomAddress`).
        denoise_folder: ``(source_dir, output_dir) -> derived series folder`` (e.g. :class:`BundleDenoiser`).
        ae_title: this listener's AE title (also the calling AE title when forwarding).
        port: TCP port to receive on.
        series_timeout: seconds without a new instance after which a series is complete.
        log: where the one-line messages go.
        poll: seconds between looks at the spool.
    """

    def __init__(
        self,
        spool: str | os.PathLike | SeriesSpool,
        forward: str | DicomAddress,
        denoise_folder: DenoiseFolder,
        *,
        ae_title: str = "LDCTCLIP",
        port: int = 11112,
        series_timeout: float = 10.0,
        log: Callable[[str], None] = print,
        poll: float = 0.2,
    ) -> None:
        self.spool = spool if isinstance(spool, SeriesSpool) else SeriesSpool(spool)
        self.forward = parse_dicom_address(forward) if isinstance(forward, str) else forward
        self.denoise_folder = denoise_folder
        self.ae_title, self.port = ae_title, int(port)
        self.series_timeout, self.poll = float(series_timeout), float(poll)
        self.log = log
        self.scp = StorageSCP(self.spool, ae_title=ae_title, port=port)
        self.processed = self.failed = self.skipped = 0

    def serve(self, stop: threading.Event) -> None:
        """Receive and process series until ``stop`` is set; then stop receiving and return.

        Raises:
            InputError: the port cannot be listened on.
        """
        waiting = self.spool.recover()
        self.scp.start()
        self.log(
            f"listening as {self.ae_title} on port {self.port}, forwarding to {self.forward}; "
            f"spool {self.spool.root} ({waiting} series waiting)"
        )
        try:
            while not stop.is_set():
                for series_uid in self.spool.quiet_series(self.series_timeout):
                    if stop.is_set():
                        break
                    self.process(series_uid)
                stop.wait(self.poll)
        finally:
            self.scp.stop()
        self.log(
            f"stopped: {self.processed} series denoised, {self.failed} failed, {self.skipped} skipped; "
            f"{self.spool.waiting()} series left in {self.spool.root} for the next run"
        )

    def process(self, series_uid: str) -> bool:
        """Denoise and forward one gathered series; log one line. Returns whether it succeeded."""
        folder = self.spool.take(series_uid)
        n_instances = sum(1 for p in folder.iterdir() if p.is_file())
        if _is_ldct_clip_output(folder):
            # a PACS that routes every CT series here sends our own results back: not again, and no loop
            self.spool.done(folder)
            self.skipped += 1
            self.log(f"series {series_uid}: {n_instances} instances: skipped, ldct-clip's own output")
            return True
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=".derived-", dir=self.spool.root))
        try:
            derived = self.denoise_folder(folder, scratch / series_uid)
            sent = send_folder(derived, self.forward, calling_ae=self.ae_title)
        # a listener outlives bad series: whatever one series raises is reported and set aside
        except Exception as error:
            kept = self.spool.set_aside(folder)
            self.failed += 1
            reason = str(error) if isinstance(error, LdctClipError) else f"{type(error).__name__}: {error}"
            self.log(
                f"series {series_uid}: {n_instances} instances: failed: {_one_line(reason)}; kept in {kept} "
                f"(move it to {self.spool.incoming} to retry)"
            )
            return False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.spool.done(folder)
        self.processed += 1
        self.log(
            f"series {series_uid}: {n_instances} instances denoised, {sent} stored at {self.forward} "
            f"in {time.perf_counter() - start:.1f} s"
        )
        return True


def _is_ldct_clip_output(folder: Path) -> bool:
    first = next((p for p in sorted(folder.iterdir()) if is_dicom_file(p)), None)
    if first is None:
        return False
    try:
        return is_denoising_contribution(pydicom.dcmread(first, stop_before_pixels=True))
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return False  # the pipeline reports what is wrong with the file


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_listener(listener: SeriesListener) -> int:
    """Serve until SIGTERM or SIGINT (installed here, so call from the main thread); return the exit code."""
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        listener.serve(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
