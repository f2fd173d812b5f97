"""DICOMweb source and sink against a real Orthanc: the round trip, every bad condition in one line, and
no half-stored series."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import certifi
import pytest
import torch
from denoise_helpers import TINY_SET, phantom_series, tiny_checkpoint
from orthanc import (
    GUEST,
    GUEST_PASSWORD,
    PASSWORD,
    USER,
    OrthancProxy,
    cli_denoiser,
    copy_as_new_series,
    free_port,
    running_orthanc,
    write_instances,
)

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io import load_ct
from ldct_clip.io.dicomweb import (
    DicomWebAuth,
    fetch_series,
    is_dicomweb_url,
    list_ct_series,
    parse_auth,
    parse_dicomweb_url,
    store_series,
)
from ldct_clip.io.provenance import is_denoising_contribution

AUTH = DicomWebAuth(USER, PASSWORD)
ENV = {"LDCT_CLIP_DICOMWEB_USER": USER, "LDCT_CLIP_DICOMWEB_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def data(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    ct = phantom_series(root / "ct")
    study_uid, ct_uid = server.upload(ct)
    # an MR series in the same study, and a study with nothing but MR
    _, mr_uid = server.upload(phantom_series(root / "mr", seed=1, Modality="MR", StudyInstanceUID=study_uid))
    mr_study, mr_only_uid = server.upload(phantom_series(root / "mr_only", seed=2, Modality="MR"))
    return {
        "root": root,
        "ct": ct,
        "study": study_uid,
        "ct_url": server.series_url(study_uid, ct_uid),
        "mr_url": server.series_url(study_uid, mr_uid),
        "mr_study_url": f"{server.dicomweb_root}/studies/{mr_study}",
    }


@pytest.fixture
def hung_port():
    """A port that accepts connections and never answers (a stuck server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_urls_are_split_into_root_study_and_series():
    url = parse_dicomweb_url("https://pacs.example.org:8443/wado/rs/studies/1.2.3/series/4.5.6/")
    assert (url.root, url.study_uid, url.series_uid) == (
        "https://pacs.example.org:8443/wado/rs",
        "1.2.3",
        "4.5.6",
    )
    assert str(url) == "https://pacs.example.org:8443/wado/rs/studies/1.2.3/series/4.5.6"
    study = parse_dicomweb_url("http://h:8042/dicom-web/studies/1.2.3")
    assert (study.root, study.study_uid, study.series_uid) == ("http://h:8042/dicom-web", "1.2.3", None)
    assert parse_dicomweb_url("http://h:8042/dicom-web/").root == "http://h:8042/dicom-web"
    assert parse_dicomweb_url("http://h").root == "http://h"
    for bad in ("http://h/dicom-web/studies/", "http://h/studies/1.2/instances/3", "ftp://h/x", "series/1.2"):
        with pytest.raises(InputError):
            parse_dicomweb_url(bad)
    assert is_dicomweb_url("http://h/x") and is_dicomweb_url("https://h:1/")
    # local paths, including what pathlib makes of a URL, are not URLs
    assert not any(map(is_dicomweb_url, ("ct/series", "C:/data", "http:/h/x", Path("http://h/x"))))


def test_credentials_from_file_environment_or_token(tmp_path):
    auth_file = tmp_path / "auth"
    auth_file.write_text("# PACS research account\nalice:s3:cret\n")
    env = {"LDCT_CLIP_DICOMWEB_USER": "bob", "LDCT_CLIP_DICOMWEB_PASSWORD": "pw"}
    assert parse_auth(auth_file, env=env) == DicomWebAuth("alice", "s3:cret")  # the file wins
    assert parse_auth(env=env) == DicomWebAuth("bob", "pw")
    assert parse_auth(env={"LDCT_CLIP_DICOMWEB_TOKEN": "t0k"}) == DicomWebAuth(token="t0k")
    assert parse_auth(token="abc", env={}).session().headers["Authorization"] == "Bearer abc"
    assert parse_auth(auth_file, env={}).session().auth == ("alice", "s3:cret")
    assert parse_auth(env={}) == DicomWebAuth()
    assert "s3:cret" not in repr(parse_auth(auth_file, env={}))
    assert parse_auth(env={}, insecure=True).session().verify is False
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert parse_auth(env={}, ca_bundle=ca).session().verify == str(ca)
    (tmp_path / "empty").write_text("# nothing\n")
    for kwargs in (
        {"auth_file": auth_file, "token": "abc"},
        {"auth_file": tmp_path / "missing"},
        {"auth_file": tmp_path / "empty"},
        {"insecure": True, "ca_bundle": ca},
        {"ca_bundle": tmp_path / "missing.pem"},
    ):
        with pytest.raises(InputError) as error:
            parse_auth(env={}, **kwargs)
        assert "\n" not in str(error.value)


def test_fetch_denoise_store_matches_local_denoise(server, data, tmp_path):
    """The PACS route gives the derived series `ldct-clip denoise` writes to a folder, in the same study."""
    denoise = cli_denoiser(tiny_checkpoint(tmp_path / "tiny.pt"))
    fetched = fetch_series(data["ct_url"], tmp_path / "fetched", AUTH, timeout=10)
    assert len(list(fetched.iterdir())) == 4
    report = store_series(denoise(fetched, tmp_path / "derived"), server.dicomweb_root, AUTH, timeout=10)
    assert report.stored == 4 and report.study_uid == data["study"]
    assert report.series_uid in server.series_uids(data["study"])
    stored = server.instances(report.series_uid)
    assert len(stored) == 4
    assert all(ds.ImageType[0] == "DERIVED" and ds.StudyInstanceUID == data["study"] for ds in stored)
    from_pacs = load_ct(write_instances(stored, tmp_path / "from_pacs"), include_derived=True)
    local = load_ct(denoise(data["ct"], tmp_path / "local"), include_derived=True)
    assert torch.equal(from_pacs.as_tensor(), local.as_tensor())  # to 0 HU
    assert (from_pacs.as_tensor() != load_ct(data["ct"]).as_tensor()).any()  # and it was denoised
    # a later --recursive over the study does not take the derived series for a source
    study_url = f"{server.dicomweb_root}/studies/{data['study']}"
    assert data["ct_url"] in list_ct_series(study_url, AUTH)
    assert report.url not in list_ct_series(study_url, AUTH)
    assert report.url in list_ct_series(study_url, AUTH, include_derived=True)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_certificates_are_verified_unless_told_otherwise(server, data, tmp_path, monkeypatch):
    # as on many hospital machines: the options must win over requests' environment variable
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    with OrthancProxy(server.url, tls_folder=tmp_path) as https:
        url = data["ct_url"].replace(server.url, https.url)
        assert url.startswith("https://")
        with pytest.raises(
            InputError, match=r"TLS certificate of 127.0.0.1:\d+ not trusted: pass --ca-bundle"
        ):
            fetch_series(url, tmp_path / "default", AUTH, timeout=5)
        with_ca = parse_auth(env=ENV, ca_bundle=https.certificate)
        assert len(list(fetch_series(url, tmp_path / "with_ca", with_ca).iterdir())) == 4
        insecure = parse_auth(env=ENV, insecure=True)
        assert len(list(fetch_series(url, tmp_path / "insecure", insecure).iterdir())) == 4


def test_recursive_takes_only_the_ct_series_of_a_study(server, data):
    urls = list_ct_series(f"{server.dicomweb_root}/studies/{data['study']}", AUTH)
    assert data["ct_url"] in urls and data["mr_url"] not in urls
    with pytest.raises(InputError, match="holds no CT series .only MR"):
        list_ct_series(data["mr_study_url"], AUTH)


def _source_cases(server, data, hung_port):
    ct = parse_dicomweb_url(data["ct_url"])
    return {
        "server down": (
            f"http://127.0.0.1:{free_port()}/dicom-web/studies/1.2/series/3.4",
            AUTH,
            "cannot reach",
        ),
        "wrong URL": (
            data["ct_url"].replace("/dicom-web/", "/dicomweb/"),
            AUTH,
            "no DICOMweb service at .*dicomweb .HTTP 404",
        ),
        "series not found": (server.series_url(ct.study_uid, "1.2.3.4"), AUTH, "series 1.2.3.4 not found"),
        "study not found": (server.series_url("1.2.3", ct.series_uid), AUTH, "not found in study 1.2.3"),
        "wrong password": (data["ct_url"], DicomWebAuth(USER, "wrong"), "refused the credentials .HTTP 401"),
        "no credentials": (data["ct_url"], DicomWebAuth(), "HTTP 401.*--auth-file / --token"),
        "forbidden": (data["ct_url"], DicomWebAuth(GUEST, GUEST_PASSWORD), "forbids this .HTTP 403"),
        "not CT": (data["mr_url"], AUTH, "is MR, not CT"),
        "timeout": (
            f"http://127.0.0.1:{hung_port}/dicom-web/studies/1.2/series/3.4",
            AUTH,
            "did not answer within",
        ),
        "study URL": (f"{server.dicomweb_root}/studies/{ct.study_uid}", AUTH, "names no series.*--recursive"),
    }


CASES = (
    "server down",
    "wrong URL",
    "series not found",
    "study not found",
    "wrong password",
    "no credentials",
    "forbidden",
    "not CT",
    "timeout",
    "study URL",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_source_is_one_line_and_stores_nothing(server, data, hung_port, tmp_path, case):
    url, auth, message = _source_cases(server, data, hung_port)[case]
    before = server.instance_count()
    start = time.monotonic()
    with pytest.raises(InputError, match=message) as error:
        fetch_series(url, tmp_path / "fetched", auth, timeout=0.5)
    assert "\n" not in str(error.value)
    assert time.monotonic() - start < 5
    assert not (tmp_path / "fetched").exists() or not any((tmp_path / "fetched").iterdir())
    assert server.instance_count() == before


@pytest.mark.parametrize(
    ("root", "auth", "message"),
    [
        ("down", AUTH, "cannot reach"),
        ("/dicomweb", AUTH, "HTTP 404"),
        ("/dicom-web", DicomWebAuth(USER, "wrong"), "HTTP 401"),
        ("/dicom-web", DicomWebAuth(GUEST, GUEST_PASSWORD), "HTTP 403"),
        ("/dicom-web/studies/1.2.3", AUTH, "names a study"),
        ("hung", AUTH, "did not answer within"),
    ],
)
def test_bad_destination_is_one_line_and_stores_nothing(
    server, data, hung_port, tmp_path, root, auth, message
):
    derived = copy_as_new_series(data["ct"], tmp_path / "derived")
    url = {"down": f"http://127.0.0.1:{free_port()}", "hung": f"http://127.0.0.1:{hung_port}"}.get(
        root, server.url + root
    )
    before = server.instance_count()
    with pytest.raises(OutputError, match=message) as error:
        store_series(derived, url, auth, timeout=0.5)
    assert "\n" not in str(error.value)
    assert server.instance_count() == before


def test_stow_refused_in_the_middle_is_rolled_back_on_orthanc(server, data, tmp_path):
    derived = copy_as_new_series(data["ct"], tmp_path / "derived")
    before = server.instance_count()
    server.refuse_stow_after(2)
    try:
        with pytest.raises(OutputError) as error:
            store_series(derived, server.dicomweb_root, AUTH, timeout=5)
    finally:
        server.refuse_stow_after(-1)
    message = str(error.value)
    assert "\n" not in message
    assert "failed after 2 of 4 instances" in message and "HTTP 403" in message
    assert "deleted the partial series from Orthanc" in message
    assert server.instance_count() == before


def test_series_already_on_the_server_is_refused_and_kept(server, data, tmp_path):
    derived = copy_as_new_series(data["ct"], tmp_path / "derived")
    assert store_series(derived, server.dicomweb_root, AUTH).stored == 4
    after_first = server.instance_count()
    with pytest.raises(OutputError, match="already at .*nothing stored"):
        store_series(derived, server.dicomweb_root, AUTH)
    assert server.instance_count() == after_first  # a refusal never deletes what was there


def test_transient_errors_are_retried_a_bounded_number_of_times(server, data, tmp_path):
    with OrthancProxy(server.url, fail_stows=1) as proxy:
        report = store_series(
            copy_as_new_series(data["ct"], tmp_path / "a"), f"{proxy.url}/dicom-web", AUTH, retry_wait=0.05
        )
    assert report.stored == 4 and proxy.stows == 5  # one 503, retried, then four stored
    before = server.instance_count()
    refused = "after 0 of 4 instances: .*HTTP 503.*nothing was stored"
    with OrthancProxy(server.url, fail_stows=100) as proxy, pytest.raises(OutputError, match=refused):
        store_series(
            copy_as_new_series(data["ct"], tmp_path / "b"),
            f"{proxy.url}/dicom-web",
            AUTH,
            retries=2,
            retry_wait=0.05,
        )
    assert proxy.stows == 3 and server.instance_count() == before


def _cli(*argv) -> int:
    from ldct_clip.cli import main

    return main(
        ["denoise", *map(str, argv), "--device", "cpu", "--no-progress", "--timeout", "10", *TINY_SET]
    )


def test_cli_series_url_to_dicomweb_root(server, data, tmp_path, monkeypatch, capsys):
    """The acceptance round trip through the command itself: a new series in the same study, as many
    instances as the source, DERIVED, pixels equal (to 0 HU) to what the command writes to a folder."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    before = set(server.series_uids(data["study"]))
    assert _cli(data["ct_url"], server.dicomweb_root, "--weights", weights) == 0
    printed = capsys.readouterr().out
    assert "denoised 4 slices" in printed and "stored 4 instances" in printed
    (new,) = set(server.series_uids(data["study"])) - before
    stored = server.instances(new)
    assert len(stored) == 4 and all(ds.ImageType[0] == "DERIVED" for ds in stored)
    assert _cli(data["ct"], tmp_path / "local", "--weights", weights) == 0
    from_pacs = load_ct(write_instances(stored, tmp_path / "from_pacs"), include_derived=True)
    local = load_ct(tmp_path / "local", include_derived=True)
    assert torch.equal(from_pacs.as_tensor(), local.as_tensor())
    # the study again with --recursive: only its CT source series is taken (not MR, not the derived one)
    study_url = f"{server.dicomweb_root}/studies/{data['study']}"
    assert _cli(study_url, tmp_path / "recursive", "--weights", weights, "--recursive") == 0
    taken = {folder.name for folder in (tmp_path / "recursive").iterdir()}
    # earlier tests of this module store more CT series in the study (plain copies and ldct-clip outputs)
    assert parse_dicomweb_url(data["ct_url"]).series_uid in taken
    assert new not in taken and parse_dicomweb_url(data["mr_url"]).series_uid not in taken
    assert not any(is_denoising_contribution(server.instances(uid)[0]) for uid in taken)


def test_cli_bad_urls_are_one_line_exit_2_and_store_nothing(server, data, hung_port, tmp_path, capsys):
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    cases = _source_cases(server, data, hung_port)
    before = server.instance_count()
    for case in ("server down", "wrong password", "not CT", "series not found"):
        url, auth, message = cases[case]
        auth_file = tmp_path / "auth"
        auth_file.write_text(f"{auth.username}:{auth.password}\n")
        code = _cli(url, server.dicomweb_root, "--weights", weights, "--auth-file", auth_file)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert _cli(data["ct"], server.url + "/dicomweb", "--weights", weights, "--auth-file", auth_file) == 2
    assert "HTTP 404" in capsys.readouterr().err
    assert server.instance_count() == before
