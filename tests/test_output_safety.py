"""Trust on real data (issue 11), library level: manifests, --overwrite rules, staging leftovers of killed writes,
storage errors as one line, preflight, provenance, non-image DICOM objects, derived series, format by content."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import (
    SLICES,
    SMALL,
    as_nobody,
    dciodvfy_errors,
    dicom_files,
    killed_write,
    non_image_object,
    snapshot,
)
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRSpectroscopyStorage,
    RTStructureSetStorage,
)

import ldct_clip
from ldct_clip.cli import build_parser, main
from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.errors import InputError, OutputError
from ldct_clip.io import (
    Provenance,
    find_dicom_series,
    find_leftovers,
    load_ct,
    save_dicom_series,
    save_nifti,
    scan_dicom,
    select_series,
    staged_output,
)
from ldct_clip.io import staging as staging_module
from ldct_clip.io.jobs import plan_ct_jobs
from ldct_clip.io.manifest import (
    is_ldct_clip_output,
    manifest_problems,
    read_manifest,
    write_manifest,
)
from ldct_clip.io.preflight import check_destination, check_output, dicom_series_bytes, nifti_bytes
from ldct_clip.io.provenance import file_sha256
from ldct_clip.io.staging import FAULT_ENV, fault_point, install_signal_handlers, remove_leftovers

SHA = "bee4a582f420ad33524384131b96e5065fea844d5c99105da61efa5d68b57b1a"
DEMO = Provenance(
    weights_name="model.pt",
    weights_sha256=SHA,
    bundle_name="lowdose_ct_denoising",
    bundle_version="0.2.0",
    demo_weights=True,
    command="ldct-clip denoise in out",
)


@pytest.fixture
def source(tmp_path):
    return write_phantom_dicom(tmp_path / "source", size=SMALL, slices=SLICES, seed=2)


@pytest.fixture
def volume(source):
    return load_ct(source)


def _denoised(volume, source, out, **kwargs):
    return save_dicom_series(volume.numpy()[0] + 1.0, source, out, **kwargs)


# --- manifests and the --overwrite rule ---------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"x" * 100)
    (folder / "sub" / "b.nii.gz").write_bytes(b"y" * 7)
    write_manifest(folder, is_dir=True, provenance=DEMO, command="ldct-clip x")
    record = read_manifest(folder)
    assert record["files"] == {
        "a.dcm": {"size": 100, "sha256": file_sha256(folder / "a.dcm")},
        "sub/b.nii.gz": {"size": 7, "sha256": file_sha256(folder / "sub" / "b.nii.gz")},
    }
    assert (record["command"], record["ldct_clip_version"]) == ("ldct-clip x", ldct_clip.__version__)
    assert record["provenance"]["weights_sha256"] == SHA and record["created"]
    assert is_ldct_clip_output(folder) and manifest_problems(folder) == []
    single = tmp_path / "v.nii.gz"
    single.write_bytes(b"z" * 9)
    sidecar = write_manifest(single, is_dir=False)
    assert sidecar.name == "v.nii.gz.ldct-clip.json"
    assert read_manifest(single)["files"] == {"v.nii.gz": {"size": 9, "sha256": file_sha256(single)}}
    assert not is_ldct_clip_output(tmp_path / "missing") and read_manifest(tmp_path) is None


def test_overwrite_refuses_foreign_files_and_keeps_every_byte(tmp_path, source, volume):
    out = _denoised(volume, source, tmp_path / "study")
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3")
    before = snapshot(out)
    with pytest.raises(OutputError) as info:
        _denoised(volume, source, out, overwrite=True)
    message = str(info.value)
    assert "\n" not in message and "thesis.txt" in message and "sub/data.csv" in message
    assert "did not write" in message
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "study"]  # no staging left


def test_overwrite_refuses_an_edited_output_and_a_folder_without_manifest(tmp_path, source, volume):
    out = _denoised(volume, source, tmp_path / "den")
    victim = dicom_files(out)[2]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\0\1")
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"changed since ldct-clip wrote them: {victim.name}"):
        _denoised(volume, source, out, overwrite=True)
    assert snapshot(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scan.dcm").write_bytes(b"not ours")
    with pytest.raises(
        OutputError, match=r"1 files ldct-clip did not write \(scan\.dcm\): no ldct-clip-manifest\.json"
    ):
        _denoised(volume, source, mine, overwrite=True)
    assert (mine / "scan.dcm").read_bytes() == b"not ours"
    with pytest.raises(OutputError, match="already exists; .* overwrite=True"):
        _denoised(volume, source, out)  # without overwrite even our own output stays


def test_overwrite_replaces_an_untouched_output(tmp_path, source, volume):
    out = _denoised(volume, source, tmp_path / "den")
    old_uid = pydicom.dcmread(dicom_files(out)[0]).SeriesInstanceUID
    _denoised(volume, source, out, overwrite=True)
    assert pydicom.dcmread(dicom_files(out)[0]).SeriesInstanceUID != old_uid
    assert len(dicom_files(out)) == SLICES and manifest_problems(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    _denoised(volume, source, empty, overwrite=True)  # an empty folder has nothing to lose
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den", "empty", "source"]


def test_nifti_overwrite_rules(tmp_path, volume):
    foreign = tmp_path / "theirs.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), foreign)
    before = foreign.read_bytes()
    with pytest.raises(OutputError, match=r"not written by ldct-clip \(no theirs\.nii\.gz\.ldct-clip\.json"):
        save_nifti(volume, foreign, overwrite=True)
    assert foreign.read_bytes() == before
    ours = save_nifti(volume, tmp_path / "ours.nii.gz")
    save_nifti(volume + 5, ours, overwrite=True)
    assert manifest_problems(ours) == [] and "previous" not in read_manifest(ours)
    assert float(load_ct(ours).mean() - volume.mean()) == pytest.approx(5.0, abs=0.01)
    with open(ours, "ab") as f:
        f.write(b"\0")
    with pytest.raises(OutputError, match="changed since ldct-clip wrote it"):
        save_nifti(volume, ours, overwrite=True)
    (tmp_path / "x.nii.gz.ldct-clip.json").write_text("my notes")
    with pytest.raises(OutputError, match="not an ldct-clip manifest"):
        save_nifti(volume, tmp_path / "x.nii.gz")  # never over a file that only has our sidecar's name
    assert (tmp_path / "x.nii.gz.ldct-clip.json").read_text() == "my notes"


# --- killed writes -------------------------------------------------------------------------------------


def test_killed_write_leaves_a_recognisable_leftover_removed_by_the_next_write(tmp_path, source, volume):
    out = tmp_path / "den"
    assert killed_write("kill@slice-written#2", lambda: _denoised(volume, source, out)) == -signal.SIGKILL
    assert not out.exists()
    leftovers = find_leftovers(tmp_path)
    assert (
        len(leftovers) == 1
        and leftovers[0].name.startswith(".ldct-clip-staging-")
        and leftovers[0].name.endswith("-den")
    )
    assert len(dicom_files(leftovers[0])) == 2  # a valid-looking half series...
    marker = json.loads((leftovers[0] / ".ldct-clip-staging.json").read_text())
    assert marker["final"] == str(out) and marker["pid"] == int(leftovers[0].name.split("-")[3])
    scan = scan_dicom(tmp_path)
    assert [s.path for s in scan.series] == [source]  # ...never read as input
    assert scan.staging == leftovers and "unfinished ldct-clip output" in scan.summary()
    assert main(["info", "--check", str(tmp_path)]) == 1
    _denoised(volume, source, out)
    assert find_leftovers(tmp_path) == [] and len(dicom_files(out)) == SLICES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den", "source"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_kill_while_replacing_keeps_a_complete_output(tmp_path, source, volume, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)
    out = _denoised(volume, source, tmp_path / "den")
    old = snapshot(out)
    code = killed_write("kill@old-moved-aside", lambda: _denoised(volume, source, out, overwrite=True))
    assert code == -signal.SIGKILL
    if exchange:  # the new output is in place, the old one under the staging name
        assert manifest_problems(out) == [] and snapshot(out) != old
        assert [p.name.startswith(".ldct-clip-staging-") for p in find_leftovers(tmp_path)] == [True]
    else:  # the old output is aside, put back by the next run on the same output
        assert not out.exists()
        assert [p.name.split("-")[2] for p in find_leftovers(tmp_path)] == ["replaced", "staging"]
        assert remove_leftovers(out) and snapshot(out) == old
    _denoised(volume, source, out, overwrite=True)
    assert find_leftovers(tmp_path) == [] and manifest_problems(out) == []


def test_kill_between_sidecar_and_file_keeps_a_consistent_pair(tmp_path, volume):
    path = save_nifti(volume, tmp_path / "v.nii.gz")
    old = path.read_bytes()
    assert killed_write("kill@sidecar-published", lambda: save_nifti(volume + 7, path, overwrite=True)) == -9
    assert path.read_bytes() == old and manifest_problems(path) == []
    save_nifti(volume + 7, path, overwrite=True)
    assert find_leftovers(tmp_path) == [] and manifest_problems(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "v.nii.gz", "v.nii.gz.ldct-clip.json"]


# --- storage errors, signals, preflight ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "pattern"),
    [
        ("enospc@slice-written#2", r"no space left on device; free \d+ MB or choose another output"),
        ("eacces@staging-created", r"permission denied; choose a folder you can write to"),
        ("erofs@slice-written#1", r"read-only file system; choose an output on a writable file system"),
        ("eio@before-publish", r"input/output error; check the disk"),
        ("edquot@manifest-written", r"disk quota exceeded; free \d+ MB"),
    ],
)
def test_storage_errors_become_one_line_and_leave_nothing(
    tmp_path, source, volume, monkeypatch, fault, pattern
):
    monkeypatch.setenv(FAULT_ENV, fault)
    monkeypatch.setattr(staging_module, "_fault_hits", {})
    with pytest.raises(
        OutputError, match=rf"^cannot write {re.escape(str(tmp_path / 'den'))}: {pattern}"
    ) as info:
        _denoised(volume, source, tmp_path / "den")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_sigint_and_sigterm_remove_the_staging(tmp_path, source, volume, monkeypatch):
    monkeypatch.setattr(staging_module, "_fault_hits", {})
    monkeypatch.setenv(FAULT_ENV, "sigint@slice-written#3")
    # Python's own SIGINT handler, also where the test run was started in the background (SIGINT ignored)
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _denoised(volume, source, tmp_path / "den")
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    previous = install_signal_handlers()
    try:
        monkeypatch.setenv(FAULT_ENV, "sigterm@before-publish")
        with pytest.raises(KeyboardInterrupt, match="terminated by signal 15"):
            _denoised(volume, source, tmp_path / "den")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_fault_point_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.setattr(staging_module, "_fault_hits", {})
    fault_point("slice-written")
    assert staging_module._fault_hits == {}
    monkeypatch.setenv(FAULT_ENV, "explode@here")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        fault_point("here")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_preflight_refuses_a_read_only_folder_as_another_user():
    shared = Path(tempfile.mkdtemp(prefix="ldct-clip-ro-"))
    try:
        shared.chmod(0o755)
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        assert os.access(locked, os.W_OK)  # as root, os.access says yes: why the probe file is needed
        message = as_nobody(lambda: check_destination(locked / "out", 1000))
        assert message.startswith(f"cannot write {locked / 'out'}: permission denied in {locked}")
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(shared)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only); skipped where mounting is impossible."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); injected ENOSPC covers the disk-full case")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_found_before_and_during_writing(tiny_tmpfs, volume):
    with pytest.raises(
        OutputError,
        match=r"only \d MB free on the device of .*tmpfs, it needs 42 MB \(about 10 MB of output and 32 MB to "
        r"spare\); free \d\d MB or choose another output",
    ):
        check_destination(tiny_tmpfs / "out" / "den", 10 * 2**20)
    with (
        pytest.raises(
            OutputError, match=r"^cannot write .*big\.bin: no space left on device; free some space"
        ),
        staged_output(tiny_tmpfs / "big.bin") as staging,
    ):
        staging.write_bytes(b"\0" * 8 * 2**20)  # the real ENOSPC, not an injected one
    assert list(tiny_tmpfs.iterdir()) == []
    with pytest.raises(OutputError, match=r"v\.nii: only \d MB free .*about 3 MB of output"):
        save_nifti(make_phantom(96, 120), tiny_tmpfs / "v.nii")  # its own preflight refuses it
    assert list(tiny_tmpfs.iterdir()) == []


def test_read_only_mount_is_found_by_the_probe(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(
            OutputError, match=r"cannot write .*out: read-only file system in .*ro; choose another"
        ):
            check_destination(mount / "out", 10)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_check_output_and_size_estimates(tmp_path, source):
    assert dicom_series_bytes(300, 512, 512) >= 300 * 512 * 512 * 2
    assert nifti_bytes((512, 512, 300)) >= 512 * 512 * 300 * 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(OutputError, match="x.txt"):
        check_output(source, tmp_path / "foreign", overwrite=True, needed_bytes=1000)
    with pytest.raises(OutputError, match="lies inside the input folder"):
        check_output(source, source / "den", overwrite=False)
    assert check_output(source, tmp_path / "new" / "den", overwrite=False, needed_bytes=1000) == (
        tmp_path / "new" / "den"
    )
    assert not (tmp_path / "new").exists()  # the check creates nothing


# --- provenance ----------------------------------------------------------------------------------------


def test_provenance_in_the_derived_series(tmp_path, source, volume):
    out = _denoised(volume, source, tmp_path / "den", provenance=DEMO)
    ds = pydicom.dcmread(dicom_files(out)[0])
    assert re.search(r"sha256 [0-9a-f]{12}\b", ds.DerivationDescription)
    for text in ("model.pt", SHA[:12], "lowdose_ct_denoising 0.2.0", f"ldct-clip {ldct_clip.__version__}"):
        assert text in ds.DerivationDescription, text
    item = ds.ContributingEquipmentSequence[-1]
    assert (item.Manufacturer, item.ManufacturerModelName) == ("ldct-clip", "lowdose_ct_denoising")
    assert (
        f"ldct-clip {ldct_clip.__version__}" in item.SoftwareVersions and SHA in item.ContributionDescription
    )
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ds.SeriesDescription == "Phantom seed 2 [denoised, demo weights]"
    assert read_manifest(out)["provenance"]["weights_sha256"] == SHA
    assert dciodvfy_errors(dicom_files(out)[-1]) == []


def test_provenance_in_nifti_header_and_sidecar(tmp_path, volume):
    path = save_nifti(volume, tmp_path / "den.nii.gz", provenance=DEMO)
    descrip = nib.load(path).header["descrip"].item()
    assert (
        descrip == f"ldct-clip {ldct_clip.__version__} lowdose_ct_denoising 0.2.0 w:{SHA[:12]} demo".encode()
    )
    assert len(descrip) <= 80
    sidecar = json.loads((tmp_path / "den.nii.gz.ldct-clip.json").read_text())
    assert sidecar["provenance"]["weights_sha256"] == SHA and sidecar["provenance"]["demo_weights"] is True
    assert sidecar["files"]["den.nii.gz"]["sha256"] == file_sha256(path)
    assert sidecar["command"] == "ldct-clip denoise in out"


# --- what is read as input -----------------------------------------------------------------------------


def test_non_image_objects_are_skipped_and_counted_truncated_images_are_not(tmp_path, source):
    non_image_object(tmp_path / "sr.dcm", ComprehensiveSRStorage, "SR")
    non_image_object(tmp_path / "mrs.dcm", MRSpectroscopyStorage, "MR", Rows=1, Columns=1, DataPointRows=1)
    non_image_object(tmp_path / "gsps.dcm", GrayscaleSoftcopyPresentationStateStorage, "PR")
    non_image_object(tmp_path / "rts.dcm", RTStructureSetStorage, "RTSTRUCT")
    non_image_object(tmp_path / "kos.dcm", KeyObjectSelectionDocumentStorage, "KO")
    volume = load_ct(tmp_path)
    expected = (
        "skipped 5 non-image DICOM objects (1 Comprehensive SR, 1 Grayscale Softcopy Presentation State, "
        "1 Key Object Selection Document, 1 MR Spectroscopy, 1 RT Structure Set)"
    )
    assert volume.meta["skipped"] == expected and volume.shape[-1] == SLICES
    assert scan_dicom(tmp_path).summary() == expected
    cut = tmp_path / "cut.dcm"  # a CT image whose file ends where its pixel data should start
    ds = pydicom.dcmread(dicom_files(source)[0])
    del ds.PixelData
    ds.save_as(cut)
    assert ds.SOPClassUID == CTImageStorage
    with pytest.raises(
        InputError, match=r"cut\.dcm: the header ends before the pixel data; the file is truncated"
    ):
        load_ct(tmp_path)


def test_series_ldct_clip_denoised_are_skipped_simulated_ones_are_not(tmp_path, source, volume):
    denoised = _denoised(volume, source, tmp_path / "den", provenance=DEMO)
    simulated = _denoised(volume, source, tmp_path / "low", provenance=Provenance(task="simulated 0.25 dose"))
    legacy = _denoised(
        volume, source, tmp_path / "old"
    )  # written before provenance: its derivation text tells
    for path in dicom_files(legacy):
        ds = pydicom.dcmread(path)
        del ds.ContributingEquipmentSequence
        ds.DerivationDescription = f"Denoised by CLIPDenoiser with ldct_clip {ldct_clip.__version__}"
        ds.save_as(path)
    scan = scan_dicom(tmp_path)
    assert sorted(s.path.name for s in scan.series) == ["low", "source"]
    assert sorted(s.path.name for s in scan.derived) == ["den", "old"]
    assert "skipped 2 series ldct-clip denoised" in scan.summary() and "--include-derived" in scan.summary()
    assert len(find_dicom_series(tmp_path, include_derived=True)) == 4
    with pytest.raises(
        InputError, match=r"holds only series that ldct-clip denoised .*pass --include-derived"
    ):
        select_series(denoised)
    assert select_series(denoised, include_derived=True).path == denoised
    assert load_ct(denoised).shape == volume.shape  # a derived series alone reads back (include_derived=None)
    assert select_series(simulated).path == simulated


def test_each_header_is_read_once(tmp_path, source, monkeypatch):
    series = select_series(source)  # the scan reads every header (deferred pixel data)
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    volume = load_ct(series)  # pixels decoded from the deferred elements of those headers
    save_dicom_series(volume, series, tmp_path / "den")  # derived from the same headers
    assert reads == []
    assert float((load_ct(tmp_path / "den") - volume).abs().max()) <= 0.5


def _cli_flags() -> set[str]:
    flags = set()
    for action in build_parser()._subparsers._group_actions:
        for sub in action.choices.values():
            flags |= {s for a in sub._actions for s in a.option_strings}
    return flags


def test_messages_name_only_flags_that_exist(tmp_path, source, volume):
    mr = write_phantom_dicom(tmp_path / "mr", size=SMALL, slices=2, Modality="MR")
    denoised = _denoised(volume, source, tmp_path / "den")
    messages = []
    for path in (mr, denoised):
        with pytest.raises(InputError) as info:
            select_series(path)
        messages.append(str(info.value))
    named = {flag for message in messages for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", message)}
    assert "--allow-non-ct" not in named and "--include-derived" in named
    assert named <= _cli_flags(), named - _cli_flags()


def test_format_follows_content_not_name(tmp_path, source, volume):
    nifti = save_nifti(volume, tmp_path / "v.nii.gz")
    misnamed = tmp_path / "x.dcm"
    shutil.copy(nifti, misnamed)
    loaded = load_ct(misnamed)
    assert loaded.meta["source_kind"] == "nifti" and float((loaded - volume).abs().max()) <= 0.5
    np.testing.assert_allclose(loaded.affine.numpy(), volume.affine.numpy(), atol=1e-5)
    # the command plans it the same way: sized from its header before any work, written as NIfTI
    (job,) = plan_ct_jobs(misnamed, tmp_path / "out.nii.gz", output_format="auto")
    assert "error" not in job and str(job["output"]).endswith("out.nii.gz")
    plain = tmp_path / "y.img"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 3), np.int16), np.eye(4)), tmp_path / "y.nii")
    os.rename(tmp_path / "y.nii", plain)
    assert load_ct(plain).shape == (1, 4, 5, 3)
    dicom = tmp_path / "x.nii"
    shutil.copy(dicom_files(source)[0], dicom)
    loaded = load_ct(dicom)
    assert loaded.meta["source_kind"] == "dicom" and loaded.shape == (1, SMALL, SMALL, 1)
