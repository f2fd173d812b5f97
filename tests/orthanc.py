"""A real Orthanc for the PACS tests: its own configuration, free local ports, a temporary storage folder.

``running_orthanc(folder)`` starts ``Orthanc`` (Debian packages ``orthanc`` and ``orthanc-dicomweb``) with
the DICOMweb plugin on, HTTP basic authentication on (user ``ldct``; user ``guest`` is refused everything
with 403 by a Lua filter), a modality ``ldct`` pointing at a free port reserved for the listener under test,
and a Lua switch that makes it refuse STOW-RS requests after a given count (to test failures in the middle
of a store). It is stopped when the block ends. Tests skip when Orthanc is not installed.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests
from denoise_helpers import TINY_SET

from ldct_clip.io.dicom_series import is_dicom_file

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)
USER, PASSWORD = "ldct", "test-password"
GUEST, GUEST_PASSWORD = "guest", "guest-password"
AET, LISTENER_AET, LISTENER_MODALITY = "ORTHANC", "LDCTCLIP", "ldct"

# Lua callbacks of Orthanc 1.10: the guest is forbidden everything; STOW-RS requests past
# `stow_refuse_after` (armed by the test through /tools/execute-script) are refused with 403.
FILTER_LUA = f"""
stow_refuse_after = -1
stow_count = 0
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == '{GUEST}' then
    return false
  end
  if method == 'POST' and string.find(uri, '^/dicom%-web/studies') then
    stow_count = stow_count + 1
    if stow_refuse_after >= 0 and stow_count > stow_refuse_after then
      return false
    end
  end
  return true
end
"""


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder (not the manifest written next to them)."""
    return sorted(p for p in folder.iterdir() if is_dicom_file(p))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_orthanc() -> None:
    """Skip the calling test module where Orthanc or its DICOMweb plugin is not installed."""
    if not Path(ORTHANC).exists() or dicomweb_plugin() is None:
        pytest.skip(
            "Orthanc not installed: apt-get install orthanc orthanc-dicomweb", allow_module_level=True
        )


@dataclass
class OrthancServer:
    """A started Orthanc: its ports, URLs, and a few REST helpers the tests use."""

    http_port: int
    dicom_port: int
    listener_port: int
    folder: Path
    process: subprocess.Popen | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def forward(self) -> str:
        """Orthanc's DICOM address as ``AET@HOST:PORT``."""
        return f"{AET}@127.0.0.1:{self.dicom_port}"

    def series_url(self, study_uid: str, series_uid: str) -> str:
        return f"{self.dicomweb_root}/studies/{study_uid}/series/{series_uid}"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.session.request(method, f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, folder: Path) -> tuple[str, str]:
        """POST every file of ``folder`` to ``/instances``; return (StudyInstanceUID, SeriesInstanceUID)."""
        files = dicom_files(folder)
        for path in files:
            self.rest("POST", "/instances", data=path.read_bytes())
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)

    def orthanc_id(self, series_uid: str) -> str | None:
        found = self.rest("POST", "/tools/lookup", data=series_uid).json()
        return next((item["ID"] for item in found if item["Type"] == "Series"), None)

    def series_uids(self, study_uid: str) -> set[str]:
        found = self.rest("POST", "/tools/lookup", data=study_uid).json()
        if not found:
            return set()
        series = self.rest("GET", f"/studies/{found[0]['ID']}/series").json()
        return {s["MainDicomTags"]["SeriesInstanceUID"] for s in series}

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics").json()["CountInstances"])

    def instances(self, series_uid: str) -> list[pydicom.Dataset]:
        """Every instance of a series, as stored (read back through the REST API)."""
        orthanc_id = self.orthanc_id(series_uid)
        ids = [i["ID"] for i in self.rest("GET", f"/series/{orthanc_id}/instances").json()]
        return [pydicom.dcmread(io.BytesIO(self.rest("GET", f"/instances/{i}/file").content)) for i in ids]

    def refuse_stow_after(self, count: int) -> None:
        """Refuse (HTTP 403) every STOW-RS request after the next ``count``; ``-1`` accepts all again."""
        script = f"stow_refuse_after = {'-1' if count < 0 else f'stow_count + {count}'}"
        self.rest("POST", "/tools/execute-script", data=script)

    def store_to_listener(self, series_uid: str) -> None:
        """Have Orthanc C-STORE a series to the modality ``ldct`` (the listener under test)."""
        self.rest(
            "POST",
            f"/modalities/{LISTENER_MODALITY}/store",
            json={"Resources": [self.orthanc_id(series_uid)]},
        )

    def listener_answers(self) -> bool:
        try:
            self.rest("POST", f"/modalities/{LISTENER_MODALITY}/echo", json={"Timeout": 2})
        except requests.RequestException:
            return False
        return True


def _configuration(server: OrthancServer, plugin: str) -> dict:
    storage = server.folder / "storage"
    return {
        "Name": "ldct-clip-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD, GUEST: GUEST_PASSWORD},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "DicomModalities": {LISTENER_MODALITY: [LISTENER_AET, "127.0.0.1", server.listener_port]},
        "LuaScripts": [str(server.folder / "filter.lua")],
        "ExecuteLuaEnabled": True,  # only to arm the STOW refusal from the tests
        "SaveJobs": False,
        "HttpCompressionEnabled": False,
        "DicomScuTimeout": 10,
    }


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (``cert.pem``, ``key.pem``) in ``folder``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def running_orthanc(
    folder: Path, tls: bool = False, startup_timeout: float = 30.0
) -> Iterator[OrthancServer]:
    """Start Orthanc in ``folder`` (configuration, storage, log) and stop it when the block ends.

    Args:
        tls: serve HTTPS with a self-signed certificate (``server.certificate``).
    """
    require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(free_port(), free_port(), free_port(), folder)
    server.session.auth = (USER, PASSWORD)
    (folder / "filter.lua").write_text(FILTER_LUA)
    config = folder / "orthanc.json"
    config.write_text(json.dumps(_configuration(server, dicomweb_plugin()), indent=2))
    log = (folder / "orthanc.log").open("w")
    server.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if server.session.get(f"{server.url}/system", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {startup_timeout} s")
            time.sleep(0.1)
        yield server
    finally:
        stop_orthanc(server)
        log.close()


def stop_orthanc(server: OrthancServer) -> None:
    # killed, not terminated: its storage is thrown away, and a clean shutdown takes seconds
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


# Headers of one connection, not of the message: this proxy closes every connection (HTTP/1.0), so a
# forwarded "Keep-Alive" would have the client reuse a closed one.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)


class OrthancProxy:
    """An HTTP(S) proxy in front of a real Orthanc: a busy gateway that answers ``503`` to the first
    ``fail_stows`` STOW-RS requests (``stows`` counts those it saw), or a TLS front end.

    Orthanc 1.10 as packaged by Debian crashes on its first HTTPS connection (civetweb with OpenSSL 3), so
    TLS is tested through this proxy.

    Args:
        target: Orthanc's URL.
        fail_stows: STOW-RS requests to answer with 503 before forwarding the others.
        tls_folder: serve HTTPS with a self-signed certificate made there (``certificate``).
    """

    def __init__(self, target: str, fail_stows: int = 0, tls_folder: Path | None = None) -> None:
        self.target, self.fail_stows, self.stows = target.rstrip("/"), fail_stows, 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.certificate = None
        if tls_folder is not None:
            self.certificate, key = self_signed_certificate(tls_folder)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certificate, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.certificate else 'http'}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OrthancProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.command == "POST" and self.path.startswith("/dicom-web/"):
                    proxy.stows += 1
                    if proxy.stows <= proxy.fail_stows:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                answer = requests.request(
                    self.command, proxy.target + self.path, data=body, headers=headers, timeout=30
                )
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_DELETE = _forward

        return Handler


def cli_denoiser(weights: Path):
    """``denoise_folder(source, output)`` running ``ldct-clip denoise`` with ``weights`` on the CPU: what
    the PACS routes must give, computed the way a user computes it from a folder."""
    from ldct_clip.cli import main

    def denoise_folder(source: Path, output: Path) -> Path:
        options = ["--weights", str(weights), "--device", "cpu", "--no-progress", *TINY_SET]
        if main(["denoise", str(source), str(output), *options]) != 0:
            raise RuntimeError(f"ldct-clip denoise {source} failed")
        return output

    return denoise_folder


def write_instances(datasets: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for ds in datasets:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def copy_as_new_series(source: Path, folder: Path) -> Path:
    """``source`` with new Series and SOP Instance UIDs (a stand-in derived series, without denoising)."""
    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for path in dicom_files(source):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder
