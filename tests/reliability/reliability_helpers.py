"""Helpers shared by the reliability tests (the hypothesis profiles `ci` / `long`: tests/conftest.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[2]


def fuzz_settings() -> settings:
    """The active profile when it is `ci` or `long`; otherwise (a plain `pytest`) the bounded `ci` one."""
    name = settings.get_current_profile_name()
    return settings.get_profile(name if name in ("ci", "long") else "ci")


def console_script() -> str:
    beside = Path(sys.executable).parent / "tscompile"       # the venv's own, before anything else on PATH
    script = str(beside) if beside.is_file() else shutil.which("tscompile")
    assert script, "the tscompile console script is not installed (pip install -e .)"
    return script


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300,
            preexec_fn=None) -> subprocess.CompletedProcess:
    """`tscompile ARGS` through the installed console script, as a user runs it."""
    return subprocess.run([console_script(), *args], cwd=cwd,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn, check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, nothing on stdout, and the error as one last stderr line `error: ...` holding every needle (log
    lines of the steps that ran may come before it); returns that line."""
    lines = res.stderr.splitlines()
    assert res.returncode == 2, f"exit {res.returncode}: {res.stderr[-2000:]}"
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    assert [line for line in lines if line.startswith("error")] == lines[-1:], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stdout == ""
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]
