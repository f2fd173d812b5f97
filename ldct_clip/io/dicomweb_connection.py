"""How ldct-clip reaches a DICOMweb server: URLs, credentials, TLS verification, and one-line errors.

Shared by the source and the sink of :mod:`ldct_clip.io.dicomweb`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient

from ldct_clip.errors import InputError, LdctClipError

__all__ = [
    "DEFAULT_TIMEOUT",
    "DicomWebAuth",
    "DicomWebURL",
    "describe_request_error",
    "is_dicomweb_url",
    "make_client",
    "one_line_errors",
    "parse_auth",
    "parse_dicomweb_url",
]

#: Seconds to wait for a connection or for the next bytes of an answer.
DEFAULT_TIMEOUT = 30.0

ENV_USER, ENV_PASSWORD, ENV_TOKEN = (
    "LDCT_CLIP_DICOMWEB_USER",
    "LDCT_CLIP_DICOMWEB_PASSWORD",
    "LDCT_CLIP_DICOMWEB_TOKEN",
)
#: What to check after HTTP 401/403.
AUTH_HINT = "check --auth-file / --token (or the LDCT_CLIP_DICOMWEB_* variables)"

_UID = r"[0-9]+(?:\.[0-9]+)*"
_STUDY_PATH = re.compile(rf"^(?P<prefix>.*?)/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID}))?/?$")


@dataclass(frozen=True)
class DicomWebAuth:
    """How to talk to a DICOMweb server: credentials (HTTP basic or bearer token) and TLS verification.

    Args:
        username, password: HTTP basic credentials (both or neither).
        token: bearer token (``Authorization: Bearer ...``); excludes basic credentials.
        verify: ``True`` (check TLS certificates against the system store), ``False`` (``--insecure``) or
            the path of a CA bundle (``--ca-bundle``).
    """

    username: str | None = None
    password: str | None = None
    token: str | None = None
    verify: bool | str = True

    def session(self) -> requests.Session:
        """A ``requests`` session that sends these credentials and verifies TLS as asked."""
        session = _Session()
        if self.username is not None:
            session.auth = (self.username, self.password or "")
        if self.token is not None:
            session.headers["Authorization"] = f"Bearer {self.token}"
        session.verify = self.verify
        return session

    def __repr__(self) -> str:  # never print secrets
        who = f"user {self.username!r}" if self.username else "bearer token" if self.token else "anonymous"
        return f"DicomWebAuth({who}, verify={self.verify!r})"


class _Session(requests.Session):
    """A session whose ``verify`` is not overridden by ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``.

    requests lets those variables replace a session's CA bundle, and even ``verify=False`` (psf/requests
    #3829); ``--ca-bundle`` and ``--insecure`` must win. Proxy variables keep working.
    """

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def parse_auth(
    auth_file: str | os.PathLike | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    insecure: bool = False,
    ca_bundle: str | os.PathLike | None = None,
) -> DicomWebAuth:
    """Credentials and TLS policy from the command line, else from the environment.

    Args:
        auth_file: a text file whose first line that is not empty nor a ``#`` comment is ``USER:PASSWORD``.
        token: a bearer token.
        env: environment (default ``os.environ``): ``LDCT_CLIP_DICOMWEB_USER`` / ``..._PASSWORD`` and
            ``LDCT_CLIP_DICOMWEB_TOKEN``, used only where the matching option is not given.
        insecure: do not verify TLS certificates.
        ca_bundle: verify TLS certificates against this CA bundle (PEM) instead of the system store.

    Raises:
        InputError: unreadable or malformed auth file, both basic credentials and a token, or a missing
            CA bundle / ``insecure`` together with one.
    """
    env = os.environ if env is None else env
    username = password = None
    if auth_file is not None:
        username, password = _read_auth_file(Path(auth_file))
    elif env.get(ENV_USER):
        username, password = env[ENV_USER], env.get(ENV_PASSWORD, "")
    if token is None and username is None:
        token = env.get(ENV_TOKEN) or None
    if token is not None and username is not None:
        raise InputError("both HTTP basic credentials and a bearer token given: pass --auth-file or --token")
    if insecure and ca_bundle is not None:
        raise InputError("--insecure and --ca-bundle exclude each other: drop one")
    verify: bool | str = not insecure
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise InputError(f"CA bundle {ca_bundle} does not exist: pass the PEM file of your CA")
        verify = str(ca_bundle)
    return DicomWebAuth(username, password, token, verify)


def _read_auth_file(path: Path) -> tuple[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InputError(f"cannot read auth file {path} ({error.strerror}): give a readable file") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            username, sep, password = line.strip().partition(":")
            if sep and username:
                return username, password
            break
    raise InputError(f"auth file {path} holds no USER:PASSWORD line: write one, e.g. 'alice:secret'")


@dataclass(frozen=True)
class DicomWebURL:
    """A DICOMweb location: the service root, and optionally a study and one of its series.

    Args:
        root: ``scheme://host[:port]/prefix`` without a trailing slash (the QIDO/WADO/STOW root).
        study_uid: StudyInstanceUID, if the URL names a study.
        series_uid: SeriesInstanceUID, if the URL names a series.
    """

    root: str
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.root).netloc

    def __str__(self) -> str:
        url = self.root
        if self.study_uid:
            url += f"/studies/{self.study_uid}"
        if self.series_uid:
            url += f"/series/{self.series_uid}"
        return url


def is_dicomweb_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` is an ``http(s)://`` URL (rather than a local path). Pass the raw string:
    ``pathlib.Path`` collapses ``//``."""
    parts = urlsplit(str(text))
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def parse_dicomweb_url(text: str) -> DicomWebURL:
    """Split ``http(s)://HOST[:PORT]/PREFIX[/studies/{StudyUID}[/series/{SeriesUID}]]``.

    Raises:
        InputError: not an http(s) URL, or a ``/studies`` path that is not ``/studies/UID[/series/UID]``.
    """
    if not is_dicomweb_url(text):
        raise InputError(f"{text!r} is not an http(s):// URL: give http(s)://HOST[:PORT]/PREFIX/...")
    parts = urlsplit(str(text))
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    match = _STUDY_PATH.match(path)
    if match:
        return DicomWebURL(base + match["prefix"], match["study"], match["series"])
    if "/studies" in path:
        raise InputError(
            f"{text!r} is not a DICOMweb study or series URL: expected .../studies/STUDY_UID[/series/SERIES_UID]"
        )
    return DicomWebURL(base + path)


def make_client(url: DicomWebURL, auth: DicomWebAuth, timeout: float) -> DICOMwebClient:
    """A ``dicomweb-client`` for ``url``'s root with ``auth``, whose own retries are off."""
    client = DICOMwebClient(url.root, session=auth.session(), timeout=timeout)
    client.set_http_retry_params(retry=False)  # retries are ours: bounded, quick and reported
    return client


def describe_request_error(error: Exception, url: DicomWebURL, timeout: float) -> tuple[str, int | None]:
    """One line saying what went wrong talking to ``url``, and the HTTP status if there was one."""
    if isinstance(error, requests.exceptions.SSLError):
        return (
            f"TLS certificate of {url.host} not trusted: pass --ca-bundle FILE (or --insecure to skip the check)",
            None,
        )
    if isinstance(error, requests.exceptions.Timeout):
        return f"DICOMweb server at {url.root} did not answer within {timeout:g} s: check the server", None
    if isinstance(error, requests.exceptions.ConnectionError):
        return (
            f"cannot reach DICOMweb server at {url.root} (connection refused or unknown host): "
            "check the URL and that the server runs",
            None,
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return f"DICOMweb server at {url.root} refused the credentials (HTTP 401): {AUTH_HINT}", 401
    if status == 403:
        return (
            f"DICOMweb server at {url.root} forbids this (HTTP 403): {AUTH_HINT} and the user's rights",
            403,
        )
    if status == 404:
        return (
            f"no DICOMweb service at {url.root} (HTTP 404): check the URL's prefix "
            "(Orthanc: http://HOST:8042/dicom-web)",
            404,
        )
    if status is not None:
        return f"DICOMweb server at {url.root} answered HTTP {status} {error.response.reason}", status
    return f"DICOMweb request to {url.root} failed: {error}", None


@contextmanager
def one_line_errors(url: DicomWebURL, timeout: float, error_class: type[LdctClipError]) -> Iterator[None]:
    """Turn a ``requests`` error in the block into ``error_class`` with :func:`describe_request_error`'s line."""
    try:
        yield
    except requests.exceptions.RequestException as error:
        raise error_class(describe_request_error(error, url, timeout)[0]) from None
