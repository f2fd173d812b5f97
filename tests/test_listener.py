"""`ldct-clip listen` against a real Orthanc: C-STORE in, derived series C-STOREd back, nothing lost on
SIGTERM, a bad series does not stop the listener."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import torch
from denoise_helpers import TINY_SET, phantom_series, tiny_checkpoint
from orthanc import LISTENER_AET, cli_denoiser, dicom_files, free_port, running_orthanc, write_instances

from ldct_clip.apps.listener import SeriesListener
from ldct_clip.cli import main
from ldct_clip.errors import InputError, OutputError
from ldct_clip.io import load_ct
from ldct_clip.io.dimse import DicomAddress, SeriesSpool, StorageSCP, parse_dicom_address, send_folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def derived_series(server, study_uid: str, known: set[str], n: int) -> str | None:
    """The UID of a series new in ``study_uid`` that holds ``n`` instances, if there is one yet."""
    for uid in server.series_uids(study_uid) - known:
        if len(server.rest("GET", f"/series/{server.orthanc_id(uid)}/instances").json()) == n:
            return uid
    return None


def test_dicom_addresses_are_parsed_and_bad_ones_refused():
    assert parse_dicom_address("ORTHANC@pacs.example.org:4242") == DicomAddress(
        "ORTHANC", "pacs.example.org", 4242
    )
    assert parse_dicom_address("PACS@[::1]:104") == DicomAddress("PACS", "::1", 104)
    for bad in ("ORTHANC", "ORTHANC@host", "@host:104", "A@host:0", "A@host:http", "SEVENTEEN_CHARS_X@h:1"):
        with pytest.raises(InputError, match="AET@HOST:PORT"):
            parse_dicom_address(bad)


def test_scp_spools_each_instance_before_acknowledging_it(tmp_path):
    source = phantom_series(tmp_path / "ct")
    spool = SeriesSpool(tmp_path / "spool")
    scp = StorageSCP(spool, ae_title="LDCTCLIP", port=free_port(), host="127.0.0.1")
    scp.start()
    try:
        # send_folder returns once every instance was acknowledged: by then each is on disk
        assert send_folder(source, DicomAddress("LDCTCLIP", "127.0.0.1", scp.address[1])) == 4
        series_uid = str(pydicom.dcmread(dicom_files(source)[0]).SeriesInstanceUID)
        spooled = sorted((spool.incoming / series_uid).iterdir())
        assert len(spooled) == 4 and spool.waiting() == 1
        sent = {
            str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).pixel_array
            for p in dicom_files(source)
        }
        for path in spooled:
            ds = pydicom.dcmread(path)
            assert (
                path.name == f"{ds.SOPInstanceUID}.dcm" and (ds.pixel_array == sent[ds.SOPInstanceUID]).all()
            )
        # a series in hand when the process dies goes back to incoming in the next run
        spool.take(series_uid)
        assert spool.waiting() == 0 and len(list((spool.work / series_uid).iterdir())) == 4
        restarted = SeriesSpool(spool.root)
        assert restarted.recover() == 1 and restarted.quiet_series(0) == [series_uid]
        # an instance the spool cannot write is refused (out of resources), not acknowledged
        shutil.rmtree(spool.partial)
        spool.partial.write_text("not a folder")
        with pytest.raises(OutputError, match=r"failed after 0 of 4 instances: .*0xA700.*nothing is left"):
            send_folder(source, f"LDCTCLIP@127.0.0.1:{scp.address[1]}", retries=0)
    finally:
        scp.stop()


def test_forwarding_to_a_closed_port_is_one_line(tmp_path):
    source = phantom_series(tmp_path / "ct")
    with pytest.raises(
        OutputError, match=r"C-STORE to X@127.0.0.1:\d+ failed after 0 of 4 .*no association"
    ) as error:
        send_folder(source, f"X@127.0.0.1:{free_port()}", timeout=2, retries=1)
    assert "\n" not in str(error.value)


def test_listen_refuses_missing_weights_and_bad_forward_in_one_line(tmp_path, capsys):
    assert main(["listen", "--forward", "ORTHANC@h:4242", "--weights", str(tmp_path / "no.pt")]) == 2
    assert main(["listen", "--forward", "ORTHANC", "--spool", str(tmp_path / "spool")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "no.pt does not exist" in lines[0] and "AET@HOST:PORT" in lines[1]


@pytest.mark.slow
def test_listener_forwards_denoised_series_and_survives_a_bad_one(server, weights, tmp_path):
    study_uid, ct_uid = server.upload(phantom_series(tmp_path / "ct", seed=3))
    _, mr_uid = server.upload(
        phantom_series(tmp_path / "mr", seed=4, Modality="MR", StudyInstanceUID=study_uid)
    )
    known = server.series_uids(study_uid)
    lines: list[str] = []
    listener = SeriesListener(
        tmp_path / "spool",
        server.forward,
        cli_denoiser(weights),
        ae_title=LISTENER_AET,
        port=server.listener_port,
        series_timeout=0.5,
        log=lines.append,
    )
    stop = threading.Event()
    thread = threading.Thread(target=listener.serve, args=(stop,))
    thread.start()
    try:
        wait_for(server.listener_answers, 10, "the listener to answer C-ECHO")
        server.store_to_listener(mr_uid)  # not CT: the pipeline refuses it
        wait_for(lambda: listener.failed, 30, "the MR series to fail")
        server.store_to_listener(ct_uid)
        derived = wait_for(lambda: derived_series(server, study_uid, known, 4), 60, "the derived series")
        # routed back to the listener, ldct-clip's own output is not denoised again
        server.store_to_listener(derived)
        wait_for(lambda: len(lines) == 4, 30, "the derived series to be skipped")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    failed, done, skipped, stopped = lines[1:]
    assert failed.startswith(f"series {mr_uid}: 4 instances: failed: ") and "kept in" in failed
    assert done.startswith(f"series {ct_uid}: 4 instances denoised, 4 stored at {server.forward} in ")
    assert skipped == f"series {derived}: 4 instances: skipped, ldct-clip's own output"
    assert stopped.startswith("stopped: 1 series denoised, 1 failed, 1 skipped; 0 series left")
    assert server.series_uids(study_uid) == known | {derived}
    assert len(list(listener.spool.failed.iterdir())) == 1 and not any(listener.spool.work.iterdir())
    stored = server.instances(derived)
    assert all(ds.ImageType[0] == "DERIVED" and ds.StudyInstanceUID == study_uid for ds in stored)
    # what came back is what `ldct-clip denoise` writes for the same series
    local = load_ct(cli_denoiser(weights)(tmp_path / "ct", tmp_path / "local"), include_derived=True)
    returned = load_ct(write_instances(stored, tmp_path / "returned"), include_derived=True)
    assert torch.equal(returned.as_tensor(), local.as_tensor())


def _start_listen(server, weights: Path, spool: Path, series_timeout: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ldct_clip", "listen", "--ae-title", LISTENER_AET]
    argv += ["--port", str(server.listener_port), "--forward", server.forward, "--spool", str(spool)]
    argv += ["--series-timeout", str(series_timeout), "--weights", str(weights), "--device", "cpu", *TINY_SET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for(
            lambda: process.poll() is not None or server.listener_answers(), 180, "ldct-clip listen to start"
        )
    except AssertionError:
        process.kill()
        raise
    assert process.poll() is None, process.communicate()[0]
    return process


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return process.returncode, output


@pytest.mark.slow
def test_listen_command_round_trip_keeps_received_instances_over_a_restart(server, weights, tmp_path):
    study_uid, series_uid = server.upload(phantom_series(tmp_path / "ct", seed=5))
    known = server.series_uids(study_uid)
    spool = tmp_path / "spool"
    # first run: the series arrives, and SIGTERM comes before the series timeout
    first = _start_listen(server, weights, spool, series_timeout=600)
    try:
        server.store_to_listener(series_uid)  # returns once every instance was acknowledged
    finally:
        code, output = _stop(first)
    assert code == 0, output
    assert (
        output.strip()
        .splitlines()[-1]
        .startswith("stopped: 0 series denoised, 0 failed, 0 skipped; 1 series left in")
    )
    assert len(list((spool / "incoming" / series_uid).iterdir())) == 4
    assert server.series_uids(study_uid) == known  # nothing forwarded yet
    # second run takes up the spool: the derived series arrives in the study
    second = _start_listen(server, weights, spool, series_timeout=1)
    try:
        derived = wait_for(lambda: derived_series(server, study_uid, known, 4), 120, "the derived series")
    finally:
        code, output = _stop(second)
    assert code == 0, output
    lines = output.strip().splitlines()
    assert "(1 series waiting)" in lines[0]
    assert any(line.startswith(f"series {series_uid}: 4 instances denoised, 4 stored at ") for line in lines)
    assert lines[-1].startswith("stopped: 1 series denoised, 0 failed, 0 skipped; 0 series left")
    stored = server.instances(derived)
    assert len(stored) == 4 and all(ds.ImageType[0] == "DERIVED" for ds in stored)
    assert not any((spool / "incoming").iterdir()) and not any((spool / "work").iterdir())
