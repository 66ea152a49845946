"""The verifier through the real CLI: a tiny build verifies, a tampered artifact fails, a goal out of reach exits 1."""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tsc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tscompile", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "tiny"
    r = tsc("build", "specs/tiny.yaml", "--out", str(out), "--target", "onnx", "--target", "arm64")
    assert r.returncode == 0, r.stderr
    return out


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_generate_stops_at_eos_on_every_target_as_on_the_reference(tiny_build):
    prompt = "dog lazy upon return that"   # the tiny model's greedy text reaches its EOS here
    outs = [tsc("generate", str(tiny_build), "--prompt", prompt, "--max-new-tokens", "40", *t)
            for t in ([], ["--target", "onnx"], ["--target", "arm64"])]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    from tokenizers import Tokenizer

    from tscompile.ir import ModelIR
    from tscompile.reference import ReferenceModel
    from tscompile.verify import prompt_ids
    ir = ModelIR.load(tiny_build / "model")
    ids = prompt_ids(Tokenizer.from_str(ir.tokenizer_json), [prompt], ir.config.bos_token_id)[0]
    assert len(ReferenceModel.from_ir(ir).generate(ids, 40)) < 40     # it did stop at EOS
    assert all(r.stdout == outs[0].stdout for r in outs), [r.stdout for r in outs]


def test_build_verifies_and_writes_reports(tiny_build):
    r = tsc("verify", str(tiny_build))
    assert r.returncode == 0, r.stderr
    res = json.loads((tiny_build / "verify.json").read_text())
    assert res["ok"] and set(res["targets"]) == {"onnx", "arm64"}
    for name, t in res["targets"].items():
        assert t["outputs_ok"] and t["greedy_match"], name
        assert t["rel_l2"] < 1e-4 and t["top1"] == 1.0, name
    report = (tiny_build / "report.md").read_text()
    assert "Verdict: **PASS**" in report and "| onnx | ok |" in report and "| arm64 | ok |" in report


def test_speedup_is_the_ratio_of_median_rates_and_arm64_says_it_is_the_host_builds(tiny_build, tmp_path):
    b = copy_build(tiny_build, tmp_path / "b")   # the aarch64 binary runs under an emulator: its speed is not timed
    spec = yaml.safe_load((b / "spec.resolved.yaml").read_text())
    spec["verify"] |= {"speed_tokens": 4, "repeats": 3}
    (b / "spec.resolved.yaml").write_text(yaml.safe_dump(spec))
    r = tsc("verify", str(b))
    assert r.returncode == 0, r.stderr
    res = json.loads((b / "verify.json").read_text())
    for name, t in res["targets"].items():   # sparse over dense, medians of the interleaved samples
        sp = t["speed"]
        assert len(sp["samples_sparse"]) == len(sp["samples_dense"]) == 3 and sp["tokens"] == 4, name
        assert sp["sparse_tokens_per_s"] == statistics.median(sp["samples_sparse"]), name
        assert sp["dense_tokens_per_s"] == statistics.median(sp["samples_dense"]), name
        assert sp["speedup"] == pytest.approx(sp["sparse_tokens_per_s"] / sp["dense_tokens_per_s"], rel=1e-12), name
    assert "measured_on" not in res["targets"]["onnx"]["speed"]
    where = res["targets"]["arm64"]["speed"]["measured_on"]
    assert "host build" in where and f"arm64: tok/s measured on {where}." in (b / "report.md").read_text()


@pytest.mark.parametrize("target,rel", [("onnx", "model.onnx"), ("arm64", "weights.bin"),
                                        ("arm64", "bin/tsrun")])
def test_tampered_artifact_fails(tiny_build, tmp_path, target, rel):
    build = copy_build(tiny_build, tmp_path / "b")
    f = build / target / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x5A
    f.write_bytes(data)
    r = tsc("verify", str(build), "--target", target)
    assert r.returncode == 1
    assert f"integrity      {target:<10} {rel:>12}" in r.stderr      # the file, not a count
    res = json.loads((build / "verify.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert res["targets"][target]["tampered"] == [rel] and not res["ok"]
    assert res["targets"][target]["rel_l2"] is None                  # was Infinity, which JSON does not have
    f.unlink()
    tsc("verify", str(build), "--target", target)
    assert json.loads((build / "verify.json").read_text())["targets"][target]["tampered"] == [f"{rel} (missing)"]


def test_a_file_added_to_an_artifact_is_tampering_and_generate_refuses_it(tiny_build, tmp_path):
    build = copy_build(tiny_build, tmp_path / "b")   # a library dropped in beside the model would be loaded
    (build / "onnx" / "libextra.so").write_bytes(b"\x7fELF")
    r = tsc("verify", str(build), "--target", "onnx")
    assert r.returncode == 1
    assert json.loads((build / "verify.json").read_text())["targets"]["onnx"]["tampered"] == ["libextra.so (not built)"]
    r = tsc("generate", str(build), "--target", "onnx", "--prompt", "dog")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --target onnx: {build / 'onnx'} has changed since it was built (libextra.so (not built)); "
        "build it again (tscompile build SPEC --target onnx)")
    manifest = json.loads((build / "arm64" / "manifest.json").read_text())
    (build / "arm64" / "manifest.json").write_text(json.dumps(manifest | {"files": ["weights.bin"]}))
    r = tsc("verify", str(build), "--target", "arm64")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {build / 'arm64' / 'manifest.json'}: files: expected a mapping of file names to digests")


def test_a_target_that_is_not_verified_is_named_in_the_verdict(tiny_build, tmp_path):
    build = copy_build(tiny_build, tmp_path / "b")   # it was dropped, and the verdict read a plain PASS
    manifest = json.loads((build / "arm64" / "manifest.json").read_text())
    (build / "arm64" / "manifest.json").write_text(json.dumps(manifest | {"cache_key": "0" * 64}))   # other tools
    r = tsc("verify", str(build))
    assert r.returncode == 0, r.stderr
    why = (f"{build / 'arm64'} was built by other versions of tscompile, torch, onnx or onnxruntime than these; "
           "build it again")
    assert f"note: not verified arm64: {why}" in r.stderr
    assert "Verdict: **PASS, except arm64: not verified**" in (build / "report.md").read_text()
    assert json.loads((build / "verify.json").read_text())["targets"]["arm64"] == {"skipped": why}
    shutil.rmtree(build / "arm64")   # a target of the spec never built
    r = tsc("verify", str(build))
    assert r.returncode == 0 and "note: not verified arm64: not built" in r.stderr
    (build / "onnx" / "manifest.json").write_text(json.dumps(json.loads((build / "onnx" / "manifest.json").read_text())
                                                            | {"cannot_run": "lowered without binaries"}))
    r = tsc("verify", str(build))
    assert r.returncode == 0 and "note: not verified onnx: lowered without binaries" in r.stderr
    r = tsc("generate", str(build), "--target", "onnx", "--prompt", "dog")
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --target onnx: {build / 'onnx'} cannot run here: "
                                                      "lowered without binaries")


def test_a_file_where_the_plots_go_is_replaced(tiny_build, tmp_path):
    build = copy_build(tiny_build, tmp_path / "b")
    shutil.rmtree(build / "plots", ignore_errors=True)
    (build / "plots").write_text("not a directory")
    r = tsc("verify", str(build), "--target", "onnx")
    assert r.returncode == 0, r.stderr   # was exit 3 (FileExistsError)
    assert not (build / "plots").is_file()


def test_goal_out_of_reach_exits_1(tiny_build, tmp_path):
    build = copy_build(tiny_build, tmp_path / "b")
    spec = yaml.safe_load((build / "spec.resolved.yaml").read_text())
    spec["verify"]["goals"]["max_rel_err"] = 1e-12     # fp32 backends land near 3e-7: out of reach
    (build / "spec.resolved.yaml").write_text(yaml.safe_dump(spec))
    r = tsc("verify", str(build), "--target", "onnx")
    assert r.returncode == 1
    missed = [line for line in r.stderr.splitlines() if line.strip().startswith("max_rel_err")]
    assert missed and "onnx" in missed[0] and "1e-12" in missed[0]


def test_max_rel_err_per_target():
    """A bf16 target gets its own bound; the others keep the spec-wide one."""
    from tscompile.spec import Goals
    from tscompile.verify import check_goals
    res = {"targets": {t: {"tampered": [], "outputs_ok": True, "top1": 1.0, "rel_l2": e}
                       for t, e in [("onnx", 2e-7), ("cuda", 0.013), ("arm64", 0.5)]}}
    rows = check_goals(Goals(max_rel_err=1e-3, max_rel_err_by_target={"cuda": 3e-2}), res)
    judged = {r["target"]: (r["limit"], r["ok"]) for r in rows if r["goal"] == "max_rel_err"}
    assert judged == {"onnx": (1e-3, True), "cuda": (3e-2, True), "arm64": (1e-3, False)}
    rows = check_goals(Goals(max_rel_err_by_target={"cuda": 3e-2}), res)
    assert [(r["target"], r["ok"]) for r in rows if r["goal"] == "max_rel_err"] == [("cuda", True)]


def test_speed_and_perplexity_goals():
    """min_speedup per target (a target without a speed measurement misses it) and max_ppl_ratio per text, each
    met at its limit."""
    from tscompile.spec import Goals
    from tscompile.verify import check_goals
    ok = {"tampered": [], "outputs_ok": True, "top1": 1.0, "rel_l2": 0.0}
    res = {"targets": {"onnx": {**ok, "speed": {"speedup": 1.1}}, "arm64": {**ok, "speed": {"speedup": 1.2}},
                       "ckpt": ok},
           "quality": {"wiki": {"ppl_ratio": 1.3}, "code": {"ppl_ratio": 1.1}}}
    rows = check_goals(Goals(min_speedup={"onnx": 1.2, "arm64": 1.2, "ckpt": 1.2}, max_ppl_ratio=1.1), res)
    judged = {(r["goal"], r["target"]): r["ok"] for r in rows if r["goal"] in ("min_speedup", "max_ppl_ratio")}
    assert judged == {("min_speedup", "onnx"): False, ("min_speedup", "arm64"): True,
                      ("min_speedup", "ckpt"): False, ("max_ppl_ratio", "wiki"): False,
                      ("max_ppl_ratio", "code"): True}


def test_perplexity_ratio_is_sparse_over_dense(tmp_path):
    """The sparse model (predictor gating) against its source (exact gating), on the same tokens."""
    from tscompile.evaluate import evaluate_text
    from tscompile.tiny import add_random_predictors, make_tiny_ir
    from tscompile.verify import measure_quality
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Sparse models compute only what fires.\n" * 4)
    source = make_tiny_ir("mistral", activation="relu", seed=2)
    ir = add_random_predictors(source.clone(), rank=8, threshold=0.3)
    q = measure_quality(ir, source, {"t": str(text)}, tokens=100, seq_len=50)["t"]
    sparse = evaluate_text(ir, str(text), tokens=100, seq_len=50, gating="predictor")["perplexity"]
    dense = evaluate_text(source, str(text), tokens=100, seq_len=50, gating="exact")["perplexity"]
    assert sparse != pytest.approx(dense, rel=1e-3)
    assert (q["perplexity"], q["dense_perplexity"]) == (sparse, dense)
    assert q["ppl_ratio"] == pytest.approx(sparse / dense, rel=1e-12)
