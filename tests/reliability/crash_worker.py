"""kill -9 trials of `tscompile build`: one uninterrupted build (after a warm-up one), then builds killed with
SIGKILL at moments spread over that build's duration, each run again to completion in the same directory, until
N_TRIALS kills landed while the build was running.

    python crash_worker.py WORKDIR N_TRIALS -- BUILD ARGS (without --out)   -> JSON report on stdout

Each build is `tscompile.cli.main` in a child forked from this process, which has imported torch, onnx and
tscompile but run nothing (so no thread pool exists at fork time): a trial costs the build, not the 3-5 s of
interpreter start and imports, and the kill times cover the build itself rather than the imports.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

UNCOMPARED = {"build.log", "file-hashes.json"}     # timestamps; file mtimes (the hash memo)


def preload() -> None:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import tscompile.cli
    import tscompile.engine  # noqa: F401
    from tscompile import registry
    for name in registry.pass_names():
        registry.pass_info(name)
    registry.backend("onnx")


def start_build(args: list[str], log: Path) -> int:
    pid = os.fork()
    if pid == 0:    # the child: the CLI with its output in `log`
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from tscompile.cli import main
        try:
            main(args)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    return pid


def finish(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in UNCOMPARED}


def torn_artifacts(root: Path) -> list[str]:
    """Published target dirs whose files differ from their manifest (a build must never leave one)."""
    from tscompile.verify import file_digests
    torn = []
    for manifest in root.glob("*/manifest.json"):
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            torn.append(str(manifest))
            continue
        if files != file_digests(manifest.parent):
            torn.append(str(manifest.parent))
    return torn


def main(workdir: str, n_trials: str, *build_args: str) -> None:
    work = Path(workdir)
    args = [a for a in build_args if a != "--"]
    preload()
    finish(start_build([*args, "--out", str(work / "warm-up")], work / "warm-up.log"))   # first-use costs
    t0 = time.perf_counter()
    rc = finish(start_build([*args, "--out", str(work / "ref")], work / "ref.log"))
    duration = time.perf_counter() - t0
    report = {"duration_s": duration, "reference_rc": rc, "trials": []}
    want = digests(work / "ref")
    n, estimate, i = int(n_trials), duration, 0
    while sum(t["killed"] for t in report["trials"]) < n and i < 3 * n:
        # the k-th kill at (k + 1/2)/n of the build's duration; a build that finished first (a busy machine
        # made the reference slow) shrinks the estimate
        out, log = work / f"trial{i}", work / f"trial{i}.log"
        kill_at = estimate * (sum(t["killed"] for t in report["trials"]) + 0.5) / n
        i += 1
        pid = start_build([*args, "--out", str(out)], log)
        time.sleep(kill_at)
        os.kill(pid, signal.SIGKILL)
        killed = finish(pid) == -signal.SIGKILL
        if not killed:
            estimate *= 0.8
        torn = torn_artifacts(out) if out.exists() else []
        left = sorted(str(q.relative_to(out)) for q in out.glob("*") if q.name != "build.log") if out.exists() else []
        entries = len(list((out / ".cache" / "passes").glob("*/entry.json")))
        rc = finish(start_build([*args, "--out", str(out)], log))
        got = digests(out)
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        report["trials"].append({"kill_at_s": round(kill_at, 3), "killed": killed, "torn_after_kill": torn,
                                 "left_after_kill": left, "cache_entries_after_kill": entries,
                                 "resume_rc": rc, "differs": diff, "log_tail": log.read_text()[-600:]})
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
