"""Preflight of the workdir and the disk: each failure names `--workdir` and the reason, and
nothing is created (issue 15: a read-only workdir ended in a bare OSError)."""

import os
import shutil

import pytest

from nemocascade.jobs import preflight
from nemocascade.jobs.preflight import GiB, PreflightError, check_disk, check_workdir


def test_writable_or_creatable_workdirs_pass(tmp_path):
    check_workdir(str(tmp_path))
    check_workdir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # checked, not created


def test_file_read_only_and_uncreatable_workdirs_are_named(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreflightError, match=r"afile: exists and is not a directory$"):
        check_workdir(str(tmp_path / "afile"))
    with pytest.raises(PreflightError, match=r"cannot be created \(.*afile is not a writable"):
        check_workdir(str(tmp_path / "afile" / "run"))
    # permission bits do not bind root, so deny access the way a read-only mount would
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(preflight.os, "access", lambda p, m: real(p, m) and str(p) != str(ro))
    with pytest.raises(PreflightError, match=rf"^--workdir={ro}: not writable by this user$"):
        check_workdir(str(ro))
    with pytest.raises(PreflightError, match=rf"run: cannot be created \({ro} is not a writable"):
        check_workdir(str(ro / "run"))
    assert list(ro.iterdir()) == []


def test_disk_check_names_the_need_and_the_free_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_disk(str(tmp_path / "run"), 1 << 20, "3 checkpoints")
    with pytest.raises(PreflightError) as e:
        check_disk(str(tmp_path / "run"), free + GiB, "3 checkpoints")
    msg = str(e.value)
    assert msg.startswith(f"--workdir={tmp_path / 'run'}: 3 checkpoints need about"), msg
    assert f"GiB are free on {tmp_path}" in msg and "use another workdir" in msg
