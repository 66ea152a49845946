"""Engine: plan checks before anything runs, a real build end to end (test plug-in passes + the example
plug-in + a lowering backend), the Context passes get, target selection, verification hook."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tsc_test_plugin import tiny_spec

from tscompile import registry
from tscompile.api import BackendInfo, PassConfig
from tscompile.cache import _umask
from tscompile.engine import build, format_plan, plan_build
from tscompile.errors import GoalMissed, UserError
from tscompile.ir import ModelIR, ffn_names
from tscompile.sources import load_source
from tscompile.spec import parse_spec

HERE = Path(__file__).parent
PIPELINE = "[scale: {factor: 2}, after_scale: {bias: 0.25}, prune_neurons: {fraction: 0.25}]"


def spec_of(pipeline: str = PIPELINE, targets: str = "{ckpt: {}}", extra: str = ""):
    return parse_spec(tiny_spec(pipeline=pipeline, targets=targets, extra=extra), "s.yaml")


@pytest.mark.parametrize("pipeline, want", [
    ("[after_scale: {}]",
     "s.yaml:5: pipeline[0].after_scale: needs pass 'scale' earlier, but it is not in the pipeline"),
    ("[after_scale: {}, scale: {}]", "s.yaml:5: pipeline[0].after_scale: needs pass 'scale' earlier, "
                                     "but it comes later (pipeline[1])"),
    ("[scale: {}, wants_data: {}]", "s.yaml:5: pipeline[1].wants_data: needs text data: add a data: section "
                                    "to the spec"),
])
def test_plan_rejects_bad_pipelines(pipeline, want, tmp_path):
    with pytest.raises(UserError) as e:
        plan_build(spec_of(pipeline), tmp_path / "b")
    assert str(e.value) == want
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("pipeline, data, want", [
    ("[scale: {}, profile: {}]", "data: {train: {path: TEXT}}\n",
     "s.yaml:5: pipeline[1].profile: needs data.calib (calibration text): add it to the spec's data: section"),
    ("[threshold: {target_sparsity: 0.9}]", "",
     "s.yaml:5: pipeline[0].threshold: needs data.calib (calibration text): add it to the spec's data: section"),
])
def test_plan_names_the_data_section_a_pass_needs(pipeline, data, want, tmp_path):
    (tmp_path / "t.txt").write_text("some text")
    (tmp_path / "s.yaml").write_text(tiny_spec(pipeline=pipeline, targets="{ckpt: {}}",
                                               extra=data.replace("TEXT", str(tmp_path / "t.txt"))))
    r = subprocess.run([sys.executable, "-m", "tscompile", "build", "s.yaml", "--dry-run"], cwd=tmp_path,
                       capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(HERE)})
    assert (r.returncode, r.stderr, r.stdout) == (2, f"error: {want}\n", "")
    assert not (tmp_path / "build").exists()


def test_data_pass_keys_follow_the_text_it_reads(tmp_path):
    calib, held_out = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    held_out.write_text("Text only the verifier reads. " * 100)
    data = f"data:\n  calib: {{path: {calib}, tokens: 64, seq_len: 16}}\n"
    spec = spec_of("[scale: {}, profile: {}]", extra=data)
    out = tmp_path / "b"
    assert build(spec, out_dir=out, verify=False).ran == ["source", "scale", "profile", "target ckpt"]
    with_eval = spec_of("[scale: {}, profile: {}]", extra=data + f"  eval: {{texts: {{x: {held_out}}}}}\n")
    assert build(with_eval, out_dir=out, verify=False).ran == []        # data.eval is not an input of any pass
    calib.write_text("Other calibration text under the same name. " * 100)
    assert build(spec, out_dir=out, verify=False).ran == ["profile", "target ckpt"]


def test_corpus_keys_follow_the_corpus_text_and_a_dry_run_builds_none(tmp_path, monkeypatch):
    from tscompile.data import build_corpora
    built = build_corpora(names=["prose"])["prose"]          # the real corpus, from the shared cache dir
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "cache"))
    prose = tmp_path / "cache" / "corpora" / "prose"
    shutil.copytree(built, prose)
    spec = spec_of("[profile: {}]", extra="data:\n  calib: {path: corpus:prose, tokens: 64, seq_len: 16}\n")
    assert "profile" in build(spec, out_dir=tmp_path / "b", verify=False).ran
    key = plan_build(spec, tmp_path / "b").steps[0].key
    dry = plan_build(spec, tmp_path / "b", dry_run=True).steps[0]
    assert dry.key == key and dry.cached
    shutil.rmtree(prose)
    assert not plan_build(spec, tmp_path / "b", dry_run=True).steps[0].cached and not prose.exists()
    shutil.copytree(built, prose)
    assert plan_build(spec, tmp_path / "b").steps[0].cached
    manifest = json.loads((prose / "manifest.json").read_text())       # as a rebuild from newer packages would
    (prose / "train.txt").write_text("Other text under the same corpus name.")
    manifest["files"]["train.txt"] |= {"bytes": (prose / "train.txt").stat().st_size,
                                       "sha256": hashlib.sha256((prose / "train.txt").read_bytes()).hexdigest()}
    (prose / "manifest.json").write_text(json.dumps(manifest))
    assert plan_build(spec, tmp_path / "b").steps[0].key != key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_required_pass_needs_a_gpu_unless_dry_run(tmp_path):
    spec = spec_of("[wants_gpu: {}]")
    with pytest.raises(UserError, match=r"^s\.yaml:5: pipeline\[0\]\.wants_gpu: needs a CUDA GPU and none"):
        plan_build(spec, tmp_path / "b")
    assert "wants_gpu v1" in format_plan(plan_build(spec, tmp_path / "b", dry_run=True))


def test_missing_predecessor_rejected_by_the_cli_before_anything_runs(tmp_path):
    (tmp_path / "s.yaml").write_text(tiny_spec(pipeline="[after_scale: {}]", targets="{ckpt: {}}"))
    r = subprocess.run([sys.executable, "-m", "tscompile", "build", "s.yaml", "--no-verify"], cwd=tmp_path,
                       capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(HERE)})
    assert r.returncode == 2
    assert r.stderr == ("error: s.yaml:5: pipeline[0].after_scale: needs pass 'scale' earlier, "
                        "but it is not in the pipeline\n")
    assert not (tmp_path / "build").exists()


def _env():
    import os
    return {k: v for k, v in os.environ.items() if k != "TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD"}


def test_dry_run_plan_lists_source_passes_targets_and_cache_state(tmp_path):
    spec = spec_of(extra="verify: {goals: {min_top1: 0.9}}\n")
    text = format_plan(plan_build(spec, tmp_path / "b", dry_run=True))
    lines = text.splitlines()
    assert lines[0] == f"plan for t -> {tmp_path / 'b'}/ (cache: on)"
    assert lines[1].startswith("  source   tiny llama/swiglu (1 layers, hidden 32, seed 0)  [")
    assert lines[1].endswith("run")
    assert [ln.split()[2:4] for ln in lines[2:5]] == [["scale", "v1"], ["after_scale", "v1"], ["prune_neurons", "v1"]]
    assert lines[5].startswith("  target   ckpt v1  [") and lines[5].endswith("] run")
    assert lines[6] == '  verify   goals {"min_top1": 0.9}'
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (no verification): the test passes, the example plug-in, the ckpt backend."""
    out = tmp_path_factory.mktemp("engine") / "build"
    spec = spec_of(targets="{ckpt: {dtype: float16}}")
    plan = plan_build(spec, out, verify=False)
    result = build(spec, out_dir=out, verify=False)
    return spec, plan, result, out


def test_build_applies_every_pass_in_order(built):
    spec, _, result, out = built
    assert result.ran == ["source", "scale", "after_scale", "prune_neurons", "target ckpt"] and result.reused == []
    src = load_source(spec.source)
    model = ModelIR.load(out / "model")
    g, u, d = ffn_names(0)
    assert torch.equal(model.weights["model.norm.weight"], src.weights["model.norm.weight"] + 0.25)
    dead = (model.weights[g] == 0).all(dim=1)
    assert int(dead.sum()) == 16                                   # 25% of 64 neurons pruned by the plug-in
    assert torch.equal(model.weights[d][:, ~dead], 2 * src.weights[d][:, ~dead])
    assert (model.weights[d][:, dead] == 0).all() and (model.weights[u][dead] == 0).all()
    assert model.layers[0].stats["pruned_neurons"] == 16
    assert [p["pass"] for p in model.meta["passes"]] == ["scale", "after_scale", "prune_neurons"]
    assert model.meta["passes"][0]["config"]["factor"] == 2.0


def test_passes_get_a_real_context(built):
    _, plan, _, out = built
    ctx = ModelIR.load(out / "model").meta["scale_ctx"]
    scale_key = plan.steps[0].key
    assert ctx == {"device": "cpu", "work_dir": str(out / ".cache" / "work" / scale_key), "seed": 0,
                   "work_dir_exists": True, "has_source": True, "source_layers": 1}
    assert not (out / ".cache" / "work" / scale_key).exists()      # scratch removed once the result is cached


def test_build_dir_layout_manifest_log_and_resolved_spec(built):
    spec, plan, _, out = built
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "model", "ckpt", "spec.resolved.yaml", "build.log"}
    manifest = json.loads((out / "ckpt" / "manifest.json").read_text())
    digests = manifest.pop("files")
    assert manifest == {"n_files": 3, "dtype": "float16", "target": "ckpt", "backend_version": "1",
                        "config": {"dtype": "float16", "pause": 0.0}, "toolchain": "", "model_key": plan.final_key,
                        "cache_key": plan.targets[0].key}
    assert sorted(digests) == ["checksums.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"]
    assert digests["model/config.json"] == hashlib.sha256((out / "ckpt/model/config.json").read_bytes()).hexdigest()
    assert (out / "ckpt").stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert {p.stat().st_mode & 0o777 for p in (out / "ckpt").rglob("*") if p.is_file()} == {0o666 & ~_umask()}
    assert ModelIR.load(out / "ckpt" / "model").weights["model.norm.weight"].dtype == torch.float16
    again = parse_spec((out / "spec.resolved.yaml").read_text(), "resolved")
    assert again.model_dump(mode="json") == spec.model_dump(mode="json")
    log = (out / "build.log").read_text()
    assert "pass prune_neurons v1: running" in log and "prune_neurons: zeroed 16 neurons" in log
    assert {p.name for p in (out / ".cache" / "passes").iterdir()} == {plan.source.key} | {s.key for s in plan.steps}


def test_a_target_lowered_without_a_tool_is_lowered_again_once_it_is_there(tmp_path):
    """arm64 without the cross compiler writes no aarch64 binary, onnx without npm no native kernels: installing
    the tool must not leave the weaker artifact cached (BackendInfo.toolchain is in the target's key)."""
    from tsc_test_plugin import CkptConfig, lower_ckpt

    from tscompile.engine import why_not_current
    tools = {"cc": "none"}
    registry.register_backend(BackendInfo("tooled", "1", "ckpt with a toolchain (test)", CkptConfig, lower_ckpt,
                                          None, toolchain=lambda: f"cc: {tools['cc']}"))
    try:
        spec, out = spec_of("[scale: {}]", targets="{tooled: {}}"), tmp_path / "b"
        assert build(spec, out_dir=out, verify=False).ran == ["source", "scale", "target tooled"]
        assert build(spec, out_dir=out, verify=False).ran == []
        tools["cc"] = "/usr/bin/gcc"
        assert build(spec, out_dir=out, verify=False).ran == ["target tooled"]
        assert json.loads((out / "tooled" / "manifest.json").read_text())["toolchain"] == "cc: /usr/bin/gcc"
        assert why_not_current(out, "tooled") is None
    finally:
        registry.unregister("tooled")


def test_the_key_records_the_toolchain_as_lowering_left_it(tmp_path):
    """onnx fetches its headers while lowering: the artifact was made with them, so the next build must not lower
    it again; had the fetch failed, headers arriving later must (the key said 'to fetch' both times)."""
    from tsc_test_plugin import CkptConfig, lower_ckpt
    tools = {"headers": "to fetch", "fetch": "here"}

    def lower_fetching(*args):
        tools["headers"] = tools["fetch"]
        return lower_ckpt(*args)
    registry.register_backend(BackendInfo("fetching", "1", "ckpt fetching a tool (test)", CkptConfig, lower_fetching,
                                          None, toolchain=lambda: f"headers: {tools['headers']}"))
    try:
        spec, out = spec_of("[scale: {}]", targets="{fetching: {}}"), tmp_path / "b"
        assert build(spec, out_dir=out, verify=False).ran == ["source", "scale", "target fetching"]
        assert json.loads((out / "fetching" / "manifest.json").read_text())["toolchain"] == "headers: here"
        assert build(spec, out_dir=out, verify=False).ran == []
        tools |= {"headers": "to fetch", "fetch": "to fetch"}   # another machine, offline: the fetch fails
        assert build(spec, out_dir=out, verify=False).ran == ["target fetching"]
        assert build(spec, out_dir=out, verify=False).ran == []
        tools["headers"] = "here"   # fetched since
        assert build(spec, out_dir=out, verify=False).ran == ["target fetching"]
    finally:
        registry.unregister("fetching")


def test_a_second_build_of_the_same_dir_is_refused_while_one_runs(tmp_path):
    import fcntl
    spec, out = spec_of("[scale: {}]", targets="{}"), tmp_path / "b"
    out.mkdir()
    with open(out / ".lock", "a") as held:   # as a running build holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"^--out {out}: another tscompile build is writing it; wait for it to "
                                            "finish or choose another --out$"):
            build(spec, out_dir=out, verify=False)
        assert not (out / "model").exists()
    assert build(spec, out_dir=out, verify=False).ran == ["source", "scale"]


def test_target_selection(tmp_path):
    spec = spec_of(targets="{ckpt: {dtype: float16}}")
    assert [(t.name, t.config.dtype) for t in plan_build(spec, tmp_path, targets=["ckpt"]).targets] == [
        ("ckpt", "float16")]
    bare = spec_of(targets="{}")
    assert plan_build(bare, tmp_path).targets == []
    assert [(t.name, t.config.dtype) for t in plan_build(bare, tmp_path, targets=["ckpt"]).targets] == [
        ("ckpt", "float32")]                                       # not in the spec: the backend's defaults
    with pytest.raises(UserError, match=r"^--target ckp: unknown backend 'ckp'; did you mean 'ckpt'\?$"):
        plan_build(spec, tmp_path, targets=["ckp"])
    needy = BackendInfo("needy", "1", "needs an arch", NeedsArch, lambda *a: {}, lambda *a: None)
    registry.register_backend(needy)
    try:
        with pytest.raises(UserError, match=r"^--target needy: not in the spec and its config needs arch; add it "
                                            r"under targets:$"):
            plan_build(spec, tmp_path, targets=["needy"])
    finally:
        registry.unregister("needy")


class NeedsArch(PassConfig):
    arch: str


def test_missing_verifier_fails_the_build_loudly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tscompile.verify", None)     # as if tscompile/verify.py were absent
    with pytest.raises(ImportError):
        build(spec_of("[scale: {}]", targets="{}"), out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "model" / "config.json").is_file()   # it got that far, then failed


def test_verifier_gets_build_dir_spec_and_targets(tmp_path, monkeypatch):
    import tscompile.verify
    calls = []

    def record(build_dir, spec, targets, not_verified=None):
        calls.append((build_dir, spec.name, targets))
        raise GoalMissed("min_top1 missed")
    monkeypatch.setattr(tscompile.verify, "verify_build", record)
    with pytest.raises(GoalMissed):
        build(spec_of("[scale: {}]"), out_dir=tmp_path / "b")
    assert calls == [(tmp_path / "b", "t", ["ckpt"])]


def test_checkpoint_dir_source_is_read_in_place_not_copied(built, tmp_path):
    """A source that is already a checkpoint on disk is hashed for its key but not copied into the cache."""
    model_dir = tmp_path / "src"
    shutil.copytree(built[3] / "model", model_dir)
    spec = parse_spec(f"version: 1\nname: d\nplugins: [tsc_test_plugin]\nsource: {{path: {model_dir}}}\n"
                      "pipeline: [scale: {factor: 3}]\n", "d.yaml")
    out = tmp_path / "d"
    first = build(spec, out_dir=out, verify=False)
    assert first.ran == ["source", "scale"]
    plan = plan_build(spec, out)
    assert not plan.source.cached and plan.steps[0].cached
    assert {p.name for p in (out / ".cache" / "passes").iterdir()} == {plan.steps[0].key}
    src, got = ModelIR.load(model_dir), ModelIR.load(out / "model")
    down = ffn_names(0)[2]
    assert torch.allclose(got.weights[down], 3 * src.weights[down])
    (model_dir / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text() + " ")
    assert not plan_build(spec, out).steps[0].cached          # the source's bytes changed: so did every key


def test_an_out_dir_that_is_not_a_build_or_holds_the_source_is_refused(built, tmp_path):
    mine = tmp_path / "mine"
    (mine / "onnx").mkdir(parents=True)
    (mine / "onnx" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=f"--out {mine}: exists and is not a tscompile build dir"):
        build(spec_of("[scale: {}]"), out_dir=mine)
    assert [str(p.relative_to(mine)) for p in mine.rglob("*")] == ["onnx", "onnx/notes.txt"]
    work = tmp_path / "work"
    shutil.copytree(built[3] / "model", work / "model")
    spec = parse_spec(f"version: 1\nname: d\nplugins: [tsc_test_plugin]\nsource: {{path: {work / 'model'}}}\n"
                      "pipeline: [scale: {factor: 3}]\n", "d.yaml")
    with pytest.raises(UserError, match="holds the spec's source"):
        build(spec, out_dir=work)                     # model/ would be replaced by the build's output
    with pytest.raises(UserError, match=f"--out {work / 'model' / 'b'}: is inside the spec's source "):
        build(spec, out_dir=work / "model" / "b")     # its outputs would be hashed into the source's key
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=f"^--out {tmp_path / 'dangling'}: cannot create it \\({tmp_path / 'dangling'} "
                                        f"is a symbolic link to {tmp_path / 'gone'}, which does not exist\\)$"):
        build(spec, out_dir=tmp_path / "dangling")
    with pytest.raises(UserError, match=r"^--out /proc/tsc/b: cannot create it \(No such file or directory"):
        build(spec, out_dir=Path("/proc/tsc/b"))
    assert build(spec, out_dir=tmp_path / "new", verify=False).ran == ["source", "scale"]   # a new dir is fine
