"""Crash safety of `tscompile build`: kill -9 at moments spread over a build, then the next run completes with
outputs byte-identical to an uninterrupted build's; a full disk or a read-only output dir is a one-line error
(exit 2) that publishes nothing.

kill -9 during `relufy` training (resume is bit-identical) is tests/passes/test_relufy.py::
test_kill_and_resume_is_bit_identical.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import ROOT, assert_one_line_error, run_cli

TINY = str(ROOT / "specs" / "tiny.yaml")
TRIALS = 20


def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_build(tmp_path):
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("crash_worker.py")), str(tmp_path),
                          str(TRIALS), "--", "build", TINY, "--target", "onnx", "--no-verify"],
                         capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["reference_rc"] == 0, (tmp_path / "ref.log").read_text()[-2000:]
    trials = report["trials"]
    for t in trials:
        assert t["resume_rc"] == 0 and not t["differs"] and not t["torn_after_kill"], t
    killed = [t for t in trials if t["killed"]]
    assert len(killed) == TRIALS, trials                      # kills that landed while the build was running,
    assert any(t["cache_entries_after_kill"] == 0 for t in killed)            # some before any pass output,
    assert any(any(".onnx.tmp-" in x for x in t["left_after_kill"]) for t in killed)   # some mid-lowering
    ref = tmp_path / "ref"
    assert (ref / "onnx" / "model.onnx").is_file() and (ref / "model" / "model.safetensors").is_file()


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at path (needs root and mount permission); whether it worked."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          check=False).returncode == 0


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    if not mount_tmpfs(path, options):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def assert_nothing_published(out: Path) -> None:
    if out.exists():
        assert not (out / "model").exists() and not (out / "onnx").exists()
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # fail the write instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_full_disk_is_one_line_exit_2(tmp_path):
    """A 300 kB tmpfs as the output dir; where none can be mounted, RLIMIT_FSIZE (EFBIG instead of ENOSPC)."""
    disk = tmp_path / "small disk"
    mounted = mount_tmpfs(disk, "size=300k")
    try:
        out = disk / "build"
        res = run_cli(["build", TINY, "--target", "onnx", "--no-verify", "--out", str(out)], cwd=tmp_path,
                      preexec_fn=None if mounted else limit_file_size)
        assert_one_line_error(res, str(out), "No space left on device" if mounted else "File too large")
        assert_nothing_published(out)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_read_only_output_dir_is_one_line_exit_2(tmp_path):
    with mounted_tmpfs(tmp_path / "read only", "ro,size=1M") as ro:
        res = run_cli(["build", TINY, "--target", "onnx", "--no-verify", "--out", str(ro / "build")], cwd=tmp_path)
        assert_one_line_error(res, str(ro / "build"), "Read-only file system")
        assert list(ro.iterdir()) == []


def test_output_dir_inside_a_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "a file").write_text("x")
    out = tmp_path / "a file" / "build"
    res = run_cli(["build", TINY, "--target", "onnx", "--no-verify", "--out", str(out)], cwd=tmp_path)
    assert_one_line_error(res, str(out), "Not a directory")
