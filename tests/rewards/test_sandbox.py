"""`sandbox_status()`: can code rewards run here, and if not, what fixes it; the weak-sandbox
opt-in by environment variable."""

import shutil

import pytest

from nemocascade.rewards import sandbox
from nemocascade.rewards.code import run_tests
from nemocascade.rewards.sandbox import WEAK_SANDBOX_ENV, SandboxConfig, sandbox_status

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)
GOOD, GOOD_TESTS = "def f(x):\n    return x + 1\n", "assert f(1) == 2\n"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(sandbox, "_STATUS", {})
    monkeypatch.setattr(sandbox, "_SHOUTED", set())
    monkeypatch.delenv(WEAK_SANDBOX_ENV, raising=False)


def _broken_bwrap(tmp_path) -> str:
    """A bwrap that exists but cannot start a sandbox, as without user namespaces."""
    path = tmp_path / "bwrap"
    path.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n"
    )
    path.chmod(0o755)
    return str(path)


@needs_bwrap
def test_status_available_and_cached(monkeypatch):
    status = sandbox_status()
    assert status.available and status.usable and status.message == ""
    assert status.bwrap == shutil.which("bwrap")

    def no_second_probe(*args, **kwargs):
        raise AssertionError("sandbox_status probed twice")

    monkeypatch.setattr(sandbox, "run_sandboxed", no_second_probe)
    assert sandbox_status().available  # cached for the process


def test_status_without_bwrap_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    status = sandbox_status()
    assert not status.available and not status.weak_allowed and not status.usable
    assert status.bwrap is None
    assert "apt-get install bubblewrap" in status.message and "macOS" in status.message
    assert f"{WEAK_SANDBOX_ENV}=1" in status.message and "\n" not in status.message


def test_status_with_a_bwrap_that_cannot_start(tmp_path):
    cfg = SandboxConfig(bwrap_path=_broken_bwrap(tmp_path))
    status = sandbox_status(cfg)
    assert not status.available and not status.usable
    assert "could not start a sandbox" in status.message
    assert "No permissions to create a new namespace" in status.message
    assert "user namespaces" in status.message
    assert run_tests(GOOD, GOOD_TESTS, config=cfg).status == "sandbox_error"


def test_weak_opt_in_by_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(WEAK_SANDBOX_ENV, "1")
    cfg = SandboxConfig(bwrap_path=_broken_bwrap(tmp_path))
    assert cfg.allow_weak and not SandboxConfig(allow_weak=False).allow_weak
    status = sandbox_status(cfg)
    assert not status.available and status.weak_allowed and status.usable
    assert "Weak mode is ON" in status.message
    res = run_tests(GOOD, GOOD_TESTS, config=cfg)  # bwrap cannot start: the opted-in weak mode
    assert res.passed, res
    assert "rlimits ONLY" in capsys.readouterr().err
    monkeypatch.setenv(WEAK_SANDBOX_ENV, "no")
    assert not SandboxConfig().allow_weak
    monkeypatch.setenv(WEAK_SANDBOX_ENV, "maybe")
    with pytest.raises(ValueError, match=WEAK_SANDBOX_ENV):
        SandboxConfig()
