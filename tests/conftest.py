"""Test-wide setup: 8 simulated CPU devices (for mesh tests), fp32 matmuls, and the sandbox.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.

On a machine where bubblewrap cannot start a sandbox (not installed, or no user namespaces), the
suite opts in to the weak sandbox (`NEMOCASCADE_ALLOW_WEAK_SANDBOX=1`: rlimits only): the code it
runs is the suite's own, so the README's test command passes with and without bubblewrap. Tests of
the isolation itself skip without bwrap, and tests of the refusal unset the variable.
"""

import os

# 8 simulated devices share the machine's cores: on a loaded 2-core machine one device's thread
# can wait minutes for a collective, which XLA would otherwise abort as stuck (seen in the
# rehearsal while the other test worker ran)
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
    "--xla_cpu_collective_timeout_seconds=1800 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest  # noqa: E402

from nemocascade.sharding import reserve_cpu_collective_threads  # noqa: E402

reserve_cpu_collective_threads()  # 8 devices: a pool no collective can starve (see there)

jax.config.update("jax_default_matmul_precision", "highest")

from nemocascade.rewards.sandbox import WEAK_SANDBOX_ENV, SandboxConfig, sandbox_status  # noqa: E402

_SANDBOX = sandbox_status(SandboxConfig(allow_weak=False))
if not _SANDBOX.available:
    os.environ.setdefault(WEAK_SANDBOX_ENV, "1")


def pytest_report_header(config):
    if _SANDBOX.available:
        return f"sandbox: bubblewrap at {_SANDBOX.bwrap}"
    return (
        f"sandbox: no working bubblewrap; tests run code with {WEAK_SANDBOX_ENV}=1 (rlimits only)"
    )


@pytest.fixture(scope="session")
def load_benchmark():
    """Loads `benchmarks/<name>.py` as a module; the benchmarks put `benchmarks/` first on
    `sys.path` (their modules are named moe, generate, ...), which is kept out of the other tests
    in this process."""
    import importlib.util
    import pathlib
    import sys
    from unittest import mock

    def load(name: str):
        path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_for_test", path)
        mod = importlib.util.module_from_spec(spec)
        with mock.patch.object(sys, "path", list(sys.path)):
            spec.loader.exec_module(mod)
        return mod

    return load
