"""The real `tscompile` command: listing commands, dry run of specs/tiny.yaml, one-line errors and exit codes,
a cached second build, generate/eval/verify on a build dir, and that light commands never import torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tsc_test_plugin import fake_distribution, tiny_spec

from tscompile.cli import _take_debug, main

HERE = Path(__file__).parent
REPO = HERE.parent.parent
BUILTIN_PASSES = {"drelu", "relufy", "threshold", "magnitude", "profile", "predictors", "reorder"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", "TSCOMPILE_DEBUG")}
    return {**env, "PYTHONPATH": str(HERE), **extra}


def tsc(*args: str, cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tscompile", *args], cwd=cwd, capture_output=True, text=True,
                          env=_env(**env), timeout=300)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (for tests that patch a module)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_through_the_console_script():
    script = Path(sysconfig.get_path("scripts")) / "tscompile"      # installed beside this Python
    r = subprocess.run([str(script if script.exists() else shutil.which("tscompile")), "--help"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0
    for command in ("build", "verify", "passes", "targets", "schema", "import", "inspect", "eval", "generate", "data"):
        assert f"\n  {command} " in r.stdout


def test_plugin_module_in_the_current_directory_via_p(tmp_path):
    (tmp_path / "my_local_pass.py").write_text(
        "from tscompile.api import PassConfig, PassInfo\n"
        "class Cfg(PassConfig):\n    strength: int = 3\n"
        "PASS = PassInfo('my_local', '7', 'a local pass', Cfg, lambda ir, cfg, ctx: ir)\n")
    script = Path(sysconfig.get_path("scripts")) / "tscompile"
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    r = subprocess.run([str(script), "passes", "-p", "my_local_pass"], cwd=tmp_path, capture_output=True, text=True,
                       env=env)
    assert "my_local v7: a local pass\n    strength: int = 3\n" in r.stdout


def test_passes_lists_builtins_and_the_example_plugin():
    r = tsc("passes", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert BUILTIN_PASSES | {"prune_neurons"} <= set(rows)
    assert rows["prune_neurons"]["config"] == [{"name": "fraction", "type": "float", "required": False, "default": 0.1,
                                                "description": "share of each FFN's neurons to zero"}]
    text = tsc("passes").stdout
    assert "prune_neurons v1: zero each FFN's weakest neurons by weight norm (example plug-in)\n" \
           "    fraction: float = 0.1\n" in text


def test_targets_and_schema():
    r = tsc("targets", "--json")
    assert r.returncode == 0, r.stderr
    assert {"onnx", "arm64", "cuda"} <= {row["name"] for row in json.loads(r.stdout)}
    r = tsc("schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    passes = {next(iter(i["properties"])) for i in schema["properties"]["pipeline"]["items"]["oneOf"]}
    assert BUILTIN_PASSES | {"prune_neurons"} <= passes
    assert {"onnx", "arm64", "cuda"} <= set(schema["properties"]["targets"]["properties"])


def test_dry_run_of_the_tiny_spec(tmp_path):
    r = tsc("build", str(REPO / "specs" / "tiny.yaml"), "--dry-run", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"plan for tiny -> {tmp_path / 'b'}/ (cache: on)"
    assert lines[1].startswith("  source   tiny mistral/swiglu (2 layers, hidden 64, seed 0)")
    assert lines[2].startswith("  pass 1   drelu v")
    assert [ln.split()[1] for ln in lines if ln.startswith("  target")] == ["onnx", "arm64"]
    assert not (tmp_path / "b").exists()


def test_light_commands_do_not_import_torch():
    code = ("import sys, tscompile\n"
            "assert 'torch' not in sys.modules, 'import tscompile'\n"
            "from tscompile.cli import main\n"
            "for args in (['--help'], ['schema'], ['passes'], ['targets'],\n"
            "             ['build', 'specs/tiny.yaml', '--dry-run']):\n"
            "    try:\n"
            "        main(args)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    assert 'torch' not in sys.modules, args\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stderr[-2000:]


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path):
    (tmp_path / "x.yaml").write_text(tiny_spec(pipeline="[scale: {}]", targets="{ckpt: {}}"))
    r = tsc("build", "x.yaml", "--no-verify", cwd=tmp_path)
    assert r.returncode == 0 and "\r" not in r.stderr and "pass scale: done" in r.stderr
    (tmp_path / "t.txt").write_text("the lazy dog jumps " * 50)
    r = tsc("eval", str(tmp_path / "build" / "t"), "--text", str(tmp_path / "t.txt"), "--seq-len", "64")
    assert r.returncode == 0 and "window/s" not in r.stderr   # eval's bar over its windows


def test_bad_spec_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "x.yaml").write_text(tiny_spec(pipeline="[scale: {factor: -1}]"))
    r = tsc("build", "x.yaml", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: x.yaml:5: pipeline[0].scale.factor: must be > 0, "
                                                          "got -1\n")
    r = tsc("build", "x.yaml", "--debug", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.endswith("error: x.yaml:5: pipeline[0].scale.factor: must be > 0, got -1\n")


@pytest.mark.parametrize("args, want", [
    (["build", "x.yaml", "--debug"], (True, ["build", "x.yaml"])),
    (["--debug", "data", "build"], (True, ["data", "build"])),
    (["generate", "d", "--prompt", "--debug"], (False, ["generate", "d", "--prompt", "--debug"])),   # the prompt
    (["eval", "d", "--text", "--debug", "--debug"], (True, ["eval", "d", "--text", "--debug"])),
    (["build", "--", "--debug"], (False, ["build", "--", "--debug"])),                                # positional
])
def test_debug_is_taken_anywhere_except_as_a_value(args, want):
    assert _take_debug(args) == want


@pytest.mark.parametrize("args, want", [
    (["build"], "error: tscompile build: Missing argument 'SPEC'.\n"),
    (["build", "nope.yaml"], "error: nope.yaml: spec file not found\n"),
    (["build", "x.yaml", "--cache", "maybe"], "error: tscompile build: Invalid value for '--cache': 'maybe' is not "
                                              "one of 'on', 'off', 'redo', 'readonly'.\n"),
    (["frobnicate"], "error: tscompile: No such command 'frobnicate'.\n"),
    (["build", "x.yaml", "-p", "tsc_no_such_plugin"], "error: plug-in 'tsc_no_such_plugin' failed to import: "
                                                      "ModuleNotFoundError: No module named 'tsc_no_such_plugin'\n"),
    (["verify", "."], "error: .: not a build directory (no spec.resolved.yaml)\n"),
    (["passes", "-p", "./myplug.py"], "error: plug-in './myplug.py': give a module name, not a file path (e.g. -p "
                                      "myplug, run from the directory that holds it, or with it on PYTHONPATH)\n"),
    (["eval", ".", "--text", "x.yaml", "--tokens", "1"], "error: tscompile eval: Invalid value for '--tokens': 1 is "
                                                          "not in the range x>=2.\n"),
])
def test_usage_errors_exit_2_with_one_line(args, want, tmp_path, capsys):
    (tmp_path / "x.yaml").write_text(tiny_spec())
    os.chdir(tmp_path)
    try:
        assert run_main(capsys, *args)[::2] == (2, want)
    finally:
        os.chdir(REPO)


def test_failed_pypi_download_is_one_line_after_the_notice(tmp_path):
    # an empty local index: pip fails at once, offline; its own chatter ("Looking in links: ...") is not shown
    r = tsc("import", "pypi:tsc-no-such-package", "--out", str(tmp_path / "out"), PIP_NO_INDEX="1",
            PIP_FIND_LINKS=str(tmp_path), TSCOMPILE_CACHE=str(tmp_path / "cache"))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("downloading tsc-no-such-package from PyPI ...\nerror: pypi:tsc-no-such-package: pip download "
                        "failed: ERROR: No matching distribution found for tsc-no-such-package\n")
    assert not (tmp_path / "out").exists()


def test_broken_third_party_plugin_fails_listing_with_its_name(tmp_path):
    fake_distribution(tmp_path, "tscompile.passes", "brokencli = tsc_broken_cli_mod:PASS", "tsc_broken_cli_mod",
                      "raise ImportError('needs libfoo')\n")
    r = tsc("passes", PYTHONPATH=f"{tmp_path}:{HERE}")
    assert r.returncode == 2 and "prune_neurons v1:" in r.stdout
    assert ("error: pass plug-in 'brokencli' (tsc_broken_cli_mod:PASS) failed to load: ImportError: needs libfoo\n"
            in r.stderr)
    r = tsc("passes", PYTHONPATH=f"{tmp_path}:{HERE}", TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "brokencli" not in r.stderr and "prune_neurons" not in r.stdout


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """`tscompile build` of a tiny spec with a plug-in given by -p (not named in the spec), run twice."""
    d = tmp_path_factory.mktemp("cli")
    (d / "s.yaml").write_text(tiny_spec(pipeline="[scale: {factor: 1.5}, prune_neurons: {fraction: 0.5}]",
                                        targets="{ckpt: {}}").replace("plugins: [tsc_test_plugin]\n", ""))
    first = tsc("build", "s.yaml", "--no-verify", "-p", "tsc_test_plugin", cwd=d)
    second = tsc("build", "s.yaml", "--no-verify", "-p", "tsc_test_plugin", cwd=d)
    return d, first, second


def test_second_identical_build_is_fully_cached_and_says_so(cli_build):
    _, first, second = cli_build
    assert first.returncode == 0, first.stderr
    assert "pass prune_neurons v1: running" in first.stderr
    assert second.returncode == 0, second.stderr
    assert "running" not in second.stderr and "lowering" not in second.stderr
    assert "build t: everything cached, nothing to rebuild" in second.stderr


def test_generate_with_the_reference_model(cli_build, capsys):
    from tokenizers import Tokenizer

    from tscompile.ir import ModelIR
    from tscompile.reference import ReferenceModel
    d = cli_build[0]
    ir = ModelIR.load(d / "build" / "t" / "model")
    tok = Tokenizer.from_str(ir.tokenizer_json)
    want = tok.decode(ReferenceModel.from_ir(ir).generate(tok.encode("The quick", add_special_tokens=False).ids, 6))
    rc, out, err = run_main(capsys, "generate", str(d / "build" / "t"), "--prompt", "The quick",
                            "--max-new-tokens", "6")
    assert rc == 0 and out == "The quick" + want + "\n"
    rc, out, err = run_main(capsys, "generate", str(d / "build" / "t"), "--target", "ckpt", "--prompt", "x",
                            "--temperature", "0.5")
    assert rc == 2 and err == "error: --target decodes greedily; drop --temperature/--top-p (or drop --target)\n"


def test_eval_on_a_build_dir(cli_build, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc, out, err = run_main(capsys, "eval", str(cli_build[0] / "build" / "t"), "--text", str(text), "--json",
                            "--seq-len", "64")
    result = json.loads(out)
    assert rc == 0 and result["perplexity"] > 1 and result["tokens"] > 64
    assert 0.45 <= result["sparsity"] <= 1.0        # half of each FFN's neurons were pruned


def test_verify_reads_the_resolved_spec_and_maps_goal_missed_to_exit_1(cli_build, capsys, monkeypatch):
    import tscompile.verify
    from tscompile.errors import GoalMissed
    d = cli_build[0]
    calls = []

    def record(build_dir, spec, targets, not_verified=None):
        calls.append((build_dir, spec.pipeline[0].config.factor, targets))
        raise GoalMissed("verification goals missed:\n  min_top1  ckpt  0.5  0.99")
    monkeypatch.setattr(tscompile.verify, "verify_build", record)
    rc, out, err = run_main(capsys, "verify", str(d / "build" / "t"))
    assert rc == 1 and err == "error: verification goals missed:\n  min_top1  ckpt  0.5  0.99\n"
    assert calls == [(d / "build" / "t", 1.5, ["ckpt"])]
    rc, out, err = run_main(capsys, "verify", str(d / "build" / "t"), "--target", "onnx")
    assert rc == 2 and err == f"error: --target onnx: not built in {d / 'build' / 't'} (built: ckpt)\n"


def _fake_verifier(monkeypatch) -> list:
    """Stands in for the verifier: records the targets and writes verify.json and report.md like it does."""
    import tscompile.verify
    calls = []

    def fake(build_dir, spec, targets, not_verified=None):
        calls.append(targets)
        result = {"ok": True, "targets": {**{t: {"skipped": why} for t, why in (not_verified or {}).items()},
                                          **{t: {"outputs_ok": True} for t in targets}}}
        (build_dir / "verify.json").write_text(json.dumps(result))
        (build_dir / "report.md").write_text(f"report of {targets}")
        return result
    monkeypatch.setattr(tscompile.verify, "verify_build", fake)
    return calls


def test_report_is_shown_only_when_it_describes_this_build(tmp_path, capsys, monkeypatch):
    _fake_verifier(monkeypatch)
    spec, out = tmp_path / "s.yaml", tmp_path / "b"
    spec.write_text(tiny_spec(pipeline="[scale: {factor: 2}]", targets="{ckpt: {}}"))
    rc, stdout, err = run_main(capsys, "build", str(spec), "--out", str(out))
    assert rc == 0 and stdout == f"report: {out / 'report.md'}\n", err
    rc, stdout, err = run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify")
    assert rc == 0 and stdout == "" and (out / "report.md").is_file()    # same outputs: the report still holds
    spec.write_text(tiny_spec(pipeline="[scale: {factor: 3}]", targets="{ckpt: {}}"))
    rc, stdout, err = run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify")
    assert rc == 0 and stdout == "", err
    assert not (out / "report.md").exists() and not (out / "verify.json").exists()   # it described the old model


def test_a_build_that_fails_after_changing_outputs_leaves_no_old_report(tmp_path, capsys, monkeypatch):
    """The old verify.json, report.md and plots described the model/ the failed build replaced."""
    from tscompile import registry
    from tscompile.api import BackendInfo, PassConfig
    from tscompile.errors import UserError

    def boom(ir, cfg, outdir, ctx):
        raise UserError("boom: cannot lower")
    _fake_verifier(monkeypatch)
    registry.register_backend(BackendInfo("boom", "1", "fails to lower (test)", PassConfig, boom, None))
    try:
        spec, out = tmp_path / "s.yaml", tmp_path / "b"
        spec.write_text(tiny_spec(pipeline="[scale: {factor: 2}]", targets="{ckpt: {}}"))
        assert run_main(capsys, "build", str(spec), "--out", str(out))[0] == 0
        (out / "plots").mkdir()
        (out / "plots" / "speedup.png").write_bytes(b"png")
        spec.write_text(tiny_spec(pipeline="[scale: {factor: 3}]", targets="{ckpt: {}, boom: {}}"))
        rc, stdout, err = run_main(capsys, "build", str(spec), "--out", str(out))
        assert rc == 2 and err.endswith("boom: cannot lower\n"), err
        assert [p.name for p in out.iterdir() if p.name in ("verify.json", "report.md", ".verify.key", "plots")] == []
    finally:
        registry.unregister("boom")


def test_verify_of_a_target_the_last_spec_lacks_says_so(tmp_path, capsys):
    from tsc_test_plugin import CkptConfig, lower_ckpt

    from tscompile import registry
    from tscompile.api import BackendInfo
    registry.register_backend(BackendInfo("ckpt3", "1", "a third ckpt (test)", CkptConfig, lower_ckpt, None))
    try:
        spec, out = tmp_path / "s.yaml", tmp_path / "b"
        spec.write_text(tiny_spec(pipeline="[scale: {factor: 2}]", targets="{ckpt: {}}"))
        assert run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify", "--target", "ckpt3")[0] == 0
        assert run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify")[0] == 0
        rc, stdout, err = run_main(capsys, "verify", str(out), "--target", "ckpt3")
        assert rc == 2 and err == (f"error: --target ckpt3: {out / 'ckpt3'} is not a target of the spec its last "
                                   "build used (spec.resolved.yaml); build it again (tscompile build SPEC --target "
                                   "ckpt3)\n")
    finally:
        registry.unregister("ckpt3")


def test_verify_skips_targets_built_from_an_earlier_model(tmp_path, capsys, monkeypatch):
    from tsc_test_plugin import CkptConfig, lower_ckpt

    from tscompile import registry
    from tscompile.api import BackendInfo
    calls = _fake_verifier(monkeypatch)
    registry.register_backend(BackendInfo("ckpt2", "1", "a second ckpt (test)", CkptConfig, lower_ckpt, None))
    try:
        spec, out = tmp_path / "s.yaml", tmp_path / "b"
        spec.write_text(tiny_spec(pipeline="[scale: {factor: 2}]", targets="{ckpt: {}, ckpt2: {}}"))
        assert run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify")[0] == 0
        spec.write_text(tiny_spec(pipeline="[scale: {factor: 3}]", targets="{ckpt: {}, ckpt2: {}}"))
        assert run_main(capsys, "build", str(spec), "--out", str(out), "--no-verify", "--target", "ckpt")[0] == 0
        rc, stdout, err = run_main(capsys, "verify", str(out))
        assert rc == 0 and calls == [["ckpt"]]
        assert err == (f"note: not verified ckpt2: {out / 'ckpt2'} was built from an earlier model than model/; "
                       "build it again\n")
        rc, stdout, err = run_main(capsys, "verify", str(out), "--target", "ckpt2")
        assert rc == 2 and calls == [["ckpt"]]
        assert err == (f"error: --target ckpt2: {out / 'ckpt2'} was built from an earlier model than model/; "
                       "build it again (tscompile build SPEC --target ckpt2)\n")
        rc, stdout, err = run_main(capsys, "generate", str(out), "--target", "ckpt2", "--prompt", "x")
        assert rc == 2 and stdout == "" and "was built from an earlier model than model/; build it again" in err
        (out / "ckpt" / "manifest.json").write_text("{")   # damaged, not stale: an error naming it
        rc, stdout, err = run_main(capsys, "verify", str(out))
        assert rc == 2 and calls == [["ckpt"]]
        assert err.startswith(f"error: {out / 'ckpt' / 'manifest.json'}: unreadable (") and err.count("\n") == 1
    finally:
        registry.unregister("ckpt2")


def test_import_and_inspect_a_checkpoint_dir(cli_build, capsys, tmp_path):
    model = cli_build[0] / "build" / "t" / "model"
    rc, out, err = run_main(capsys, "import", str(model), "--out", str(tmp_path / "copy"))
    assert rc == 0 and out == f"imported {model} -> {tmp_path / 'copy'} (llama, 1 layers)\n"
    from tscompile.ir import ModelIR
    assert ModelIR.load(tmp_path / "copy").content_hash() == ModelIR.load(model).content_hash()
    rc, out, err = run_main(capsys, "inspect", str(cli_build[0] / "build" / "t"), "--json")
    assert rc == 0 and json.loads(out) == json.loads(json.dumps(_describe(model), default=str))
    rc, out, err = run_main(capsys, "inspect", str(tmp_path / "nothing-here"))
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def _describe(model_dir):
    from tscompile.inspect import describe
    from tscompile.ir import ModelIR
    return describe(ModelIR.load(model_dir))


def test_target_not_in_the_spec_is_built_with_defaults_and_recorded(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(tiny_spec(pipeline="[scale: {factor: 2}]"))
    rc, out, err = run_main(capsys, "build", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "b"), "--target", "ckpt",
                            "--no-verify")
    assert rc == 0, err
    from tscompile.spec import load_spec
    resolved = load_spec(tmp_path / "b" / "spec.resolved.yaml")
    assert resolved.targets["ckpt"].model_dump() == {"dtype": "float32", "pause": 0.0}
    assert resolved.plugins == ["tsc_test_plugin"]
    assert (tmp_path / "b" / "ckpt" / "manifest.json").is_file()


def test_tiny_spec_builds_and_verifies_end_to_end_with_onnx(tmp_path):
    """specs/tiny.yaml through the real drelu pass, onnx backend and verifier (arm64 has its own tests)."""
    args = ("build", str(REPO / "specs" / "tiny.yaml"), "--target", "onnx", "--out", str(tmp_path / "b"))
    r = tsc(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "verify.json").read_text())
    assert report["ok"] is True and report["targets"]["onnx"]["top1"] == 1.0
    assert (tmp_path / "b" / "report.md").is_file()
    again = tsc(*args)
    assert again.returncode == 0 and "everything cached, nothing to rebuild" in again.stderr


@pytest.mark.parametrize("args", [[], ["data"]])
def test_a_group_alone_prints_its_help(args, capsys):
    rc, out, err = run_main(capsys, *args)
    assert (rc, err) == (0, "") and out.startswith("Usage: tscompile") and "\nCommands:\n" in out


def test_verify_says_which_targets_it_could_not_run(tmp_path):
    (tmp_path / "x.yaml").write_text(tiny_spec(pipeline="[scale: {}]", targets="{ckpt: {}}"))
    assert tsc("build", "x.yaml", "--no-verify", cwd=tmp_path).returncode == 0
    r = tsc("verify", "build/t", cwd=tmp_path, TSC_TEST_CKPT_UNAVAILABLE="no ckpt runner here")
    assert r.returncode == 0 and "note: not verified ckpt: no ckpt runner here\n" in r.stderr
    assert r.stdout.startswith("verified build/t: no target (reference only)")
    assert "Verdict: **PASS, except ckpt: not verified**" in (tmp_path / "build/t/report.md").read_text()


def test_data_build_says_what_it_built(capsys):
    rc, out, _ = run_main(capsys, "data", "build", "--corpus", "math")
    assert rc == 0 and out.startswith("corpus math: ") and out.endswith(" held-out documents)\n")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    import signal
    (tmp_path / "x.yaml").write_text(tiny_spec(pipeline="[scale: {factor: 2, pause: 30}]", targets="{ckpt: {}}"))
    p = subprocess.Popen([sys.executable, "-m", "tscompile", "build", "x.yaml", "--no-verify"], cwd=tmp_path,
                         stderr=subprocess.PIPE, text=True, env=_env())
    for line in p.stderr:
        if "pass scale v1: running" in line:
            break
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130 and rest.endswith("error: interrupted\n"), rest
