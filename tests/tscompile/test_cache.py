"""Cache: keys, hit/miss/redo/readonly/off, invalidation by config and version, atomic publishing, and
`kill -9` of a real `tscompile build` at several moments."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tsc_test_plugin import PASSES, tiny_spec

from tscompile import cache, registry
from tscompile.api import PassInfo
from tscompile.engine import build, plan_build
from tscompile.sources import SourceSpec, source_key
from tscompile.spec import parse_spec

HERE = Path(__file__).parent


def spec_of(pipeline="[scale: {factor: 2}, after_scale: {bias: 0.5}]", targets="{ckpt: {}}"):
    return parse_spec(tiny_spec(pipeline=pipeline, targets=targets), "s.yaml")


def entries(out: Path) -> dict[str, float]:
    root = out / ".cache" / "passes"
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir() if not p.name.startswith(".")} if root.exists() else {}


def test_chain_key_depends_on_every_part():
    base = cache.chain_key("prev", "pass", "scale", "1", {"factor": 2})
    assert len(base) == 64 and base == cache.chain_key("prev", "pass", "scale", "1", {"factor": 2})
    others = [cache.chain_key("prev2", "pass", "scale", "1", {"factor": 2}),
              cache.chain_key("prev", "pass", "scalf", "1", {"factor": 2}),
              cache.chain_key("prev", "pass", "scale", "2", {"factor": 2}),
              cache.chain_key("prev", "pass", "scale", "1", {"factor": 3})]
    assert len({base, *others}) == 5
    assert set(cache.tool_versions()) == {"tscompile", "torch", "onnx", "onnxruntime"}


def test_second_build_reuses_everything(tmp_path):
    out = tmp_path / "b"
    first = build(spec_of(), out_dir=out, verify=False)
    assert first.ran == ["source", "scale", "after_scale", "target ckpt"]
    before = entries(out)
    model_mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    second = build(spec_of(), out_dir=out, verify=False)
    assert second.ran == [] and second.reused == ["scale", "after_scale", "target ckpt"]
    assert entries(out) == before and (out / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime
    assert "build t: everything cached, nothing to rebuild" in (out / "build.log").read_text()
    assert all(s.cached for s in plan_build(spec_of(), out).steps)


def test_config_change_reruns_from_that_pass(tmp_path):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    changed = build(spec_of("[scale: {factor: 2}, after_scale: {bias: 0.75}]"), out_dir=out, verify=False)
    assert changed.ran == ["after_scale", "target ckpt"]
    assert changed.reused == ["scale", "source"]        # scale's output loaded; the source for Context.source_ir
    assert len(entries(out)) == 4                       # source, scale, two after_scale versions
    target_changed = build(spec_of("[scale: {factor: 2}, after_scale: {bias: 0.75}]", "{ckpt: {dtype: float16}}"),
                           out_dir=out, verify=False)
    assert target_changed.ran == ["target ckpt"]


def test_pass_version_change_invalidates_it_and_what_follows(tmp_path):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    scale = next(p for p in PASSES if p.name == "scale")
    bumped = PassInfo(scale.name, "2", scale.doc, scale.config, scale.run)
    registry.unregister("scale")
    registry.register_pass(bumped)
    try:
        assert build(spec_of(), out_dir=out, verify=False).ran == ["scale", "after_scale", "target ckpt"]
    finally:
        registry.unregister("scale")
        registry.register_pass(scale)


def test_redo_recomputes_and_rewrites(tmp_path):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    before = entries(out)
    redo = build(spec_of(), out_dir=out, verify=False, policy="redo")
    assert redo.ran == ["source", "scale", "after_scale", "target ckpt"]
    after = entries(out)
    assert set(after) == set(before) and all(after[k] > before[k] for k in before)


def test_readonly_uses_hits_and_never_writes(tmp_path):
    out = tmp_path / "b"
    cold = build(spec_of("[scale: {factor: 2}]"), out_dir=out, verify=False, policy="readonly")
    assert cold.ran == ["source", "scale", "target ckpt"]
    assert entries(out) == {} and not (out / ".cache" / "work").exists()
    assert (out / "model" / "config.json").is_file() and (out / "ckpt" / "manifest.json").is_file()
    build(spec_of("[scale: {factor: 2}]"), out_dir=out, verify=False, policy="redo")   # fill the cache
    filled = entries(out)
    warm = build(spec_of(), out_dir=out, verify=False, policy="readonly")
    assert warm.ran == ["after_scale", "target ckpt"] and warm.reused[0] == "scale"
    assert entries(out) == filled


def test_off_neither_reads_nor_writes(tmp_path):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    before = entries(out)
    assert (out / "model" / "model.safetensors").stat().st_nlink == 2     # model/ is hard-linked to the cache
    off = build(spec_of(), out_dir=out, verify=False, policy="off")
    assert off.ran == ["source", "scale", "after_scale", "target ckpt"] and entries(out) == before
    assert (out / "model" / "model.safetensors").stat().st_nlink == 1     # written fresh, not from the cache


def test_an_edited_artifact_is_lowered_again(tmp_path):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    (out / "ckpt" / "checksums.json").write_text("{}")
    assert not plan_build(spec_of(), out).targets[0].cached
    assert build(spec_of(), out_dir=out, verify=False).ran == ["target ckpt"]
    assert (out / "ckpt" / "checksums.json").read_text() != "{}"


def test_a_plan_reads_unchanged_artifacts_once(tmp_path, monkeypatch):
    out = tmp_path / "b"
    build(spec_of(), out_dir=out, verify=False)
    assert plan_build(spec_of(), out).targets[0].cached        # hashes the artifact, records it in the memo
    memo = json.loads((out / ".cache" / "file-hashes.json").read_text())
    artifact = {str(p.resolve()) for p in (out / "ckpt").rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert artifact and artifact <= {stamp.rsplit("|", 2)[0] for stamp in memo}
    monkeypatch.setattr(cache, "sha256_file", lambda p: pytest.fail(f"read {p} again"))
    assert plan_build(spec_of(), out).targets[0].cached


def test_the_hash_memo_keeps_one_stamp_per_file(tmp_path):
    f, memo = tmp_path / "f.bin", tmp_path / "memo.json"
    for text in (b"a", b"bb", b"ccc"):
        f.write_bytes(text)
        assert cache.memo_digests([f], memo, True) == [hashlib.sha256(text).hexdigest()]
    assert list(json.loads(memo.read_text()).values()) == [hashlib.sha256(b"ccc").hexdigest()]


def test_a_passed_verification_is_reused_a_missed_one_is_not(tmp_path, monkeypatch):
    import tscompile.verify
    from tscompile.errors import GoalMissed
    calls, verdicts = [], ["pass", "pass", "miss", "pass"]

    def fake_verify(build_dir, spec, targets, not_verified=None):   # the verifier: writes verify.json like it does
        calls.append(spec.verify.steps)
        (build_dir / "verify.json").write_text(json.dumps({"ok": verdicts[len(calls) - 1] == "pass"}))
        if verdicts[len(calls) - 1] == "miss":
            raise GoalMissed("missed")
        return {"ok": True, "targets": {t: {"outputs_ok": True} for t in targets}}
    monkeypatch.setattr(tscompile.verify, "verify_build", fake_verify)
    out = tmp_path / "b"
    build(spec_of(), out_dir=out)
    again = build(spec_of(), out_dir=out)
    assert calls == [32] and again.ran == [] and again.verify == {"ok": True}
    steps8 = parse_spec(tiny_spec(pipeline="[scale: {factor: 2}, after_scale: {bias: 0.5}]", targets="{ckpt: {}}",
                                  extra="verify: {steps: 8}\n"), "s.yaml")
    assert build(steps8, out_dir=out).ran == ["verify"] and calls == [32, 8]
    with pytest.raises(GoalMissed):
        build(spec_of(), out_dir=out)
    assert build(spec_of(), out_dir=out).ran == ["verify"] and calls == [32, 8, 32, 32]


def test_verification_is_redone_when_eval_text_changes_or_a_target_could_not_run(tmp_path, monkeypatch):
    import tscompile.verify
    calls, skipped = [], {}

    def fake_verify(build_dir, spec, targets, not_verified=None):
        calls.append(1)
        result = {"ok": True, "targets": {"ckpt": skipped}}
        (build_dir / "verify.json").write_text(json.dumps(result))
        return result
    monkeypatch.setattr(tscompile.verify, "verify_build", fake_verify)
    text = tmp_path / "eval.txt"
    text.write_text("some held-out text")
    spec = parse_spec(tiny_spec(pipeline="[scale: {}]", targets="{ckpt: {}}",
                                extra=f"data: {{eval: {{texts: {{p: {text}}}}}}}\n"), "s.yaml")
    out = tmp_path / "b"
    build(spec, out_dir=out)
    assert build(spec, out_dir=out).ran == [] and len(calls) == 1
    text.write_text("other held-out text")                       # its perplexity goal may now miss
    assert build(spec, out_dir=out).ran == ["verify"] and len(calls) == 2
    skipped["skipped"] = "no GPU here"                             # reported, not judged: checked again next time
    text.write_text("third held-out text")
    assert build(spec, out_dir=out).ran == ["verify"] and len(calls) == 3
    assert build(spec, out_dir=out).ran == ["verify"] and len(calls) == 4


def test_publish_dir_replaces_and_sweep_removes_only_dead_writers(tmp_path):
    final = tmp_path / "t"
    for text in ("one", "two"):
        tmp = cache.temp_dir(tmp_path, "t")
        (tmp / "f").write_text(text)
        cache.publish_dir(tmp, final)
    assert (final / "f").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = cache._HOST
    (tmp_path / f".x.tmp-{dead.pid}-{host}-abc").mkdir()
    (tmp_path / f".y.tmp-{os.getpid()}-{host}-abc").mkdir()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8        # its pid means nothing here: kept
    (tmp_path / f".z.tmp-{dead.pid}-{other_host}-abc").mkdir()
    (tmp_path / f".w.tmp-{dead.pid}-q7_x2kpz").mkdir()           # named before host tags: this host's, swept
    cache.sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".y.tmp-{os.getpid()}-{host}-abc",
                                                          f".z.tmp-{dead.pid}-{other_host}-abc", "t"]


# ---- kill -9 in the middle of a real build ------------------------------------------------------------

KILL_SPEC = tiny_spec(pipeline="[scale: {factor: 2, pause: 0.4}, after_scale: {}, prune_neurons: {fraction: 0.5}]",
                      targets="{ckpt: {pause: 0.4}}")
# (log line that must appear in this run, seconds to wait after it): each run gets further, as the cache fills.
# The pauses (0.4 s in scale and in the ckpt backend) make the 2nd and 4th kills land inside a step / a write.
KILL_MOMENTS = [("source: loading", 0.0), ("pass scale v1: running", 0.2), ("pass scale: done", 0.0),
                ("target ckpt v1: lowering", 0.2), ("target ckpt v1: lowering", 0.42)]


def _build_cmd() -> list[str]:
    return [sys.executable, "-m", "tscompile", "build", "s.yaml", "--no-verify"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD"}
    return {**env, "PYTHONPATH": str(HERE), "OMP_WAIT_POLICY": "PASSIVE"}


def _kill_when_logged(cwd: Path, line: str, delay: float) -> bool:
    """Start a build; SIGKILL it `delay` s after `line` shows up in this run's part of build.log.
    False if the build finished first."""
    log = cwd / "build" / "t" / "build.log"
    start = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(_build_cmd(), cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if log.exists():
                with open(log) as f:
                    f.seek(start)
                    if line in f.read():
                        time.sleep(delay)
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _digest(d: Path) -> dict[str, str]:
    """Every file's sha256 but the log's and the hash memo's (which records mtimes)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in ("build.log", "file-hashes.json")}


def _assert_nothing_half_done(out: Path, ref: Path) -> None:
    """Whatever looks complete is byte-identical to the uninterrupted build's; the rest is hidden temp names."""
    for entry in (out / ".cache" / "passes").glob("[!.]*"):
        assert (entry / "entry.json").is_file(), entry
        assert _digest(entry) == _digest(ref / ".cache" / "passes" / entry.name), entry
    if (out / "ckpt" / "manifest.json").exists():
        assert _digest(out / "ckpt") == _digest(ref / "ckpt")
    else:
        assert not (out / "ckpt").exists()
    if (out / ".model.key").exists():
        assert _digest(out / "model") == _digest(ref / "model")
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible <= {"model", "ckpt", "spec.resolved.yaml", "build.log"}


def test_kill_9_at_any_moment_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(KILL_SPEC)
    monkeypatch.chdir(tmp_path)        # the uninterrupted reference, in-process, at the CLI's relative build path
    build(parse_spec(KILL_SPEC, "s.yaml"), out_dir=Path("build/t"), verify=False)
    ref = tmp_path / "ref"
    os.replace(tmp_path / "build" / "t", ref)            # same build path for both runs: same bytes expected
    killed, inside_a_write = 0, 0
    for line, delay in KILL_MOMENTS:
        killed += _kill_when_logged(tmp_path, line, delay)
        _assert_nothing_half_done(tmp_path / "build" / "t", ref)
        inside_a_write += bool(list((tmp_path / "build" / "t").rglob(".*.tmp-*")))   # swept by the next run
    assert killed >= 4 and inside_a_write >= 1
    r = subprocess.run(_build_cmd(), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "build" / "t"
    assert not list(out.rglob(".*.tmp-*")) and not list(out.rglob(".*.old-*"))
    assert _digest(out) == _digest(ref)
    shutil.rmtree(ref)


def test_files_are_hashed_in_chunks_with_the_same_digests(tmp_path, monkeypatch):
    from tscompile.verify import file_digests
    data = os.urandom(40 * 1024**2 + 7)                 # more than one chunk
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.bin").write_bytes(data)
    (tmp_path / "small.txt").write_text("x")
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read all of {self} at once"))
    want = {"small.txt": hashlib.sha256(b"x").hexdigest(), "sub/big.bin": hashlib.sha256(data).hexdigest()}
    assert file_digests(tmp_path) == want
    assert cache.sha256_file(tmp_path / "sub" / "big.bin") == want["sub/big.bin"]


def test_atomic_text_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        cache.write_text_atomic(tmp_path / "a" / "f.txt", "one")
        cache.write_text_atomic(tmp_path / "a" / "f.txt", "two")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "f.txt").read_text() == "two"
    assert (tmp_path / "a" / "f.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]


def test_a_killed_memo_write_leaves_a_temp_file_that_the_next_write_removes(tmp_path, killed_at_rename):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"weights")
    (tmp_path / "model" / "config.json").write_text("{}")      # what a source dir needs to be taken for one
    memo = tmp_path / "build" / "file-hashes.json"
    killed_at_rename("from pathlib import Path\n"
                     "from tscompile.sources import SourceSpec, source_key\n"
                     f"source_key(SourceSpec(path={str(tmp_path / 'model')!r}), Path({str(memo)!r}))\n")
    assert len(list(memo.parent.iterdir())) == 1 and not memo.exists()
    key = source_key(SourceSpec(path=str(tmp_path / "model")), memo)
    assert list(memo.parent.iterdir()) == [memo]
    assert source_key(SourceSpec(path=str(tmp_path / "model")), memo) == key


def test_published_files_get_ordinary_permissions_and_executables_stay_executable(tmp_path):
    umask = cache._umask()
    for mode, want in ((0o600, 0o666), (0o700, 0o777), (0o500, 0o777)):
        (tmp_path / "f").touch()
        (tmp_path / "f").chmod(mode)
        cache.ordinary_permissions(tmp_path / "f")
        assert (tmp_path / "f").stat().st_mode & 0o777 == want & ~umask


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), cache.atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_new_temps_sweep_dead_writers_beside_them_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{dead.pid}-{cache._HOST}-abc"
    deep = tmp_path / "sub" / f".z.tmp-{tag}"
    for p in (tmp_path / f".x.tmp-{tag}", tmp_path / f".y.old-{tag}", deep):
        p.mkdir(parents=True)
    (tmp_path / f".w.download.tmp-{tag}").write_bytes(b"part")
    with cache.scratch_dir(tmp_path, "download") as scratch:
        assert sorted(p.name for p in tmp_path.iterdir()) == [scratch.name, "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and deep.is_dir()
    cache.write_text_atomic(deep.parent / "f.txt", "x")
    assert [p.name for p in deep.parent.iterdir()] == ["f.txt"]
