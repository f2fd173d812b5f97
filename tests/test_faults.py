"""Fault injection through the real command (issue 11 acceptance): `ldct-clip denoise` killed, interrupted, refused.

Each fault runs ``ldct-clip denoise`` as a child process with ``LDCT_CLIP_FAULT`` set (see
:func:`ldct_clip.io.staging.fault_point`). Afterwards: every file the user had is byte-identical, no half
series is visible (DICOM files only in the input, in complete outputs whose manifest matches, or inside
recognisable staging leftovers), the exit status is non-zero with one line on stderr and no traceback, and
a ``--recursive`` run over the parent folder denoises only the real input series.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from denoise_helpers import TINY_SET, phantom_series, tiny_checkpoint
from io_helpers import dicom_files, snapshot

from ldct_clip.cli import main
from ldct_clip.io import find_ct_series, find_leftovers, load_ct, save_dicom_series
from ldct_clip.io.manifest import MANIFEST_NAME, manifest_problems
from ldct_clip.io.staging import FAULT_ENV, is_staging_name

pytestmark = pytest.mark.slow

NOBODY = 65534


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # world-readable, so that a child running as another user can read the weights and the series
    root = Path(tempfile.mkdtemp(prefix="ldct-clip-faults-"))
    root.chmod(0o755)
    weights = tiny_checkpoint(root / "tiny.pt")
    weights.chmod(0o644)
    series = phantom_series(root / "series", manifest=False)  # a scanner export: DICOM files only
    yield {"weights": weights, "series": series, "root": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def study(assets):
    """A user's folder: the input series and a note; outputs go next to them."""
    folder = Path(tempfile.mkdtemp(prefix="study-", dir=assets["root"]))
    folder.chmod(0o755)
    shutil.copytree(assets["series"], folder / "series")
    (folder / "notes.txt").write_text("patient notes")
    yield folder
    subprocess.run(["umount", str(folder / "full")], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def _without_write_privileges() -> tuple[list[str], object, str] | None:
    """How to run a child that file permissions apply to, as the tests run as root: (argv prefix,
    preexec_fn, what); None where neither works. User nobody where the interpreter is reachable for it,
    else root without the capabilities that override file permissions (util-linux ``setpriv``)."""

    def as_nobody():
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    def works(argv, preexec=None) -> bool:
        try:
            return subprocess.run(argv, preexec_fn=preexec, capture_output=True).returncode == 0
        except OSError:  # the interpreter lies in a folder the user cannot enter (e.g. /root/.pyenv)
            return False

    probe = [sys.executable, "-c", "pass"]
    if works(probe, as_nobody):
        return [], as_nobody, "user nobody"
    setpriv = shutil.which("setpriv")
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"] if setpriv else []
    if prefix and works([*prefix, *probe]):
        return prefix, None, "root without CAP_DAC_OVERRIDE"
    return None


def run_denoise(
    assets, source: Path, output: Path, *options: str, fault: str | None = None, unprivileged=None
):
    """``ldct-clip denoise SOURCE OUTPUT --weights TINY --device cpu --no-progress`` as a child process.

    Args:
        unprivileged: ``(argv prefix, preexec_fn, what)`` from :func:`_without_write_privileges`.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    prefix, preexec = [], None
    if unprivileged is not None:
        prefix, preexec, _ = unprivileged
        home = Path(tempfile.mkdtemp(prefix="home-", dir=assets["root"]))
        os.chown(home, NOBODY, NOBODY)
        home.chmod(0o777)
        env.update(HOME=str(home), MPLCONFIGDIR=str(home), XDG_CACHE_HOME=str(home), TMPDIR=str(home))
    argv = [*prefix, sys.executable, "-m", "ldct_clip", "denoise", str(source), str(output)]
    argv += ["--weights", str(assets["weights"]), "--device", "cpu", "--no-progress", *TINY_SET, *options]

    def child_setup() -> None:
        # a test run started in the background (`pytest &`, nohup) ignores SIGINT, and children inherit
        # that; the command must meet SIGINT as a user's terminal sends it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec is not None:
            preexec()

    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, preexec_fn=child_setup)


def assert_one_error_line(done: subprocess.CompletedProcess, *phrases: str) -> str:
    assert done.returncode not in (0, -signal.SIGKILL), done.returncode
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ldct-clip denoise:"), done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def assert_user_files_intact(before: dict[str, str]) -> None:
    after = snapshot(*{Path(p) for p in before})
    assert after == before


def assert_no_half_series(study: Path, n_slices: int = 4) -> None:
    """DICOM files only in the input, in complete ldct-clip outputs, or inside recognisable staging entries."""
    for path in study.rglob("*.dcm"):
        relative = path.relative_to(study)
        if any(is_staging_name(part) for part in relative.parts):
            continue  # a leftover of a killed run: named as ours, never read as input
        if relative.parts[0] == "series":
            continue
        folder = path.parent
        assert (folder / MANIFEST_NAME).is_file(), f"{relative} lies in a folder ldct-clip did not finish"
        assert manifest_problems(folder) == [] and len(dicom_files(folder)) == n_slices, relative


def denoise_in_process(assets, source: Path, output: Path, *options: str) -> int:
    """The same command in this process (no fault): cheaper than a child for the runs that follow a fault."""
    argv = ["denoise", str(source), str(output), "--weights", str(assets["weights"]), "--device", "cpu"]
    previous = signal.getsignal(signal.SIGTERM)  # the command may install its SIGTERM handler
    try:
        return main([*argv, "--no-progress", *TINY_SET, *options])
    finally:
        signal.signal(signal.SIGTERM, previous)


def assert_recursive_run_sees_only_the_input(assets, study: Path, tmp_path: Path) -> None:
    """What --recursive plans from, then the --recursive run itself: only the real input series."""
    assert [s.path for s in find_ct_series(study)] == [study / "series"]
    out = tmp_path / "recursive"
    assert denoise_in_process(assets, study, out, "--recursive") == 0
    written = sorted({p.parent.relative_to(out) for p in out.rglob("*.dcm")})
    assert written == [Path("series")]
    assert len(dicom_files(out / "series")) == 4


KILL_MOMENTS = [
    "kill@output-checked",  # before writing: everything checked, nothing created yet
    "kill@staging-created",  # the staging folder exists, empty but for its marker
    "kill@slice-written#2",  # during the slices: half a series in the staging folder
    "kill@slice-written#4",  # every slice written, the manifest not yet
    "kill@manifest-written",  # complete with its manifest, not published
    "kill@before-publish",  # marker removed, about to be renamed into place
    "kill@published",  # after publishing
]


@pytest.mark.parametrize("fault", KILL_MOMENTS)
def test_kill_9_at_each_moment(assets, study, tmp_path, fault):
    before = snapshot(study)
    out = study / "denoised"
    done = run_denoise(assets, study / "series", out, fault=fault)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "Traceback" not in done.stderr
    assert_user_files_intact(before)
    assert_no_half_series(study)
    leftovers = find_leftovers(study)
    if fault in ("kill@output-checked", "kill@published"):
        assert leftovers == []
        assert out.exists() == (fault == "kill@published")
    else:
        assert [p.name.split("-")[2] for p in leftovers] == ["staging"] and not out.exists()
        assert main(["info", "--check", str(study)]) == 1  # reported
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)
    # the next run on the same output removes what the killed one left
    assert denoise_in_process(assets, study / "series", out, "--overwrite") == 0
    assert find_leftovers(study) == [] and manifest_problems(out) == [] and len(dicom_files(out)) == 4


def _earlier_output(study: Path) -> Path:
    source = study / "series"
    volume = load_ct(source)
    return save_dicom_series(volume.numpy()[0] + 10.0, source, study / "denoised")


def test_kill_9_while_replacing_with_overwrite(assets, study, tmp_path):
    out = _earlier_output(study)
    before = snapshot(study / "series", study / "notes.txt")
    done = run_denoise(assets, study / "series", out, "--overwrite", fault="kill@old-moved-aside")
    assert done.returncode == -signal.SIGKILL
    assert_user_files_intact(before)
    assert out.is_dir() and manifest_problems(out) == [] and len(dicom_files(out)) == 4  # never missing
    assert_no_half_series(study)
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)


@pytest.mark.parametrize(
    ("fault", "status"),
    [("sigint@slice-written#2", 130), ("sigterm@slice-written#2", 130)],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupt_removes_the_staged_files(assets, study, tmp_path, fault, status):
    before = snapshot(study)
    done = run_denoise(assets, study / "series", study / "denoised", fault=fault)
    assert done.returncode == status, done.stderr
    assert_one_error_line(done, "interrupted")
    assert_user_files_intact(before)
    assert sorted(p.name for p in study.iterdir()) == ["notes.txt", "series"]  # no output, no staging
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)


def test_read_only_destination_as_another_user(assets, study, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the tests run as a normal user: a read-only folder is tested by test_output_safety")
    unprivileged = _without_write_privileges()
    if unprivileged is None:
        pytest.skip("neither user nobody nor setpriv can run the interpreter here")
    locked = study / "locked"
    locked.mkdir(mode=0o555)
    before = snapshot(study)
    done = run_denoise(assets, study / "series", locked / "denoised", unprivileged=unprivileged)
    assert done.returncode == 2, done.stderr
    assert_one_error_line(done, f"cannot write {locked / 'denoised'}: permission denied")
    assert "denoised 4 slices" not in done.stdout
    assert_user_files_intact(before)
    assert list(locked.iterdir()) == []
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)


def test_full_disk(assets, study, tmp_path):
    full = study / "full"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True
    )
    before = snapshot(study)
    if mounted.returncode == 0:  # a real small disk: found before any work
        try:
            done = run_denoise(assets, study / "series", full / "denoised")
            assert_one_error_line(
                done, f"cannot write {full / 'denoised'}: only", "MB free", "choose another output"
            )
            assert done.returncode == 2 and list(full.iterdir()) == []
        finally:
            subprocess.run(["umount", str(full)], capture_output=True)
    # the disk filling up while the slices are written (after every check passed)
    done = run_denoise(assets, study / "series", study / "denoised", fault="enospc@slice-written#2")
    assert done.returncode == 2
    assert_one_error_line(done, "no space left on device; free", "MB or choose another output")
    assert_user_files_intact(before)
    assert not (study / "denoised").exists() and find_leftovers(study) == []
    assert not any(is_staging_name(p.name) for p in study.rglob("*"))
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)


def test_overwrite_onto_a_folder_with_foreign_files(assets, study, tmp_path):
    out = study / "denoised"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3")
    before = snapshot(study)
    done = run_denoise(assets, study / "series", out, "--overwrite")
    assert done.returncode == 2
    assert_one_error_line(done, "thesis.txt", "sub/data.csv", "did not write")
    assert_user_files_intact(before)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "sub",
        "sub/data.csv",
        "thesis.txt",
    ]
    assert_recursive_run_sees_only_the_input(assets, study, tmp_path)
