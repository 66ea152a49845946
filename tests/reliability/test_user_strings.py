"""User strings never break generated code or paths, and only named plug-ins are imported.

A tiny model imported from a GGUF whose file name holds a newline, `#error`, `*/`, quotes, a backslash and
unicode is built through onnx and arm64 into an output dir with the same kinds of characters, verified, and run;
the generated C shows the name on its comment line only; broken weight blobs and out-of-vocabulary token ids
then go through the Python runner into that runtime. Spec names are restricted to [A-Za-z0-9._-] (so
they cannot reach generated code raw). A module in the current directory is imported only when named with -p.
"""
from __future__ import annotations

import json
import sys

import pytest
import yaml
from reliability_helpers import ROOT, assert_one_line_error, run_cli

from tscompile.errors import UserError
from tscompile.spec import parse_spec
from tscompile.tiny import make_tiny_ir

sys.path.insert(0, str(ROOT / "tests" / "tscompile"))
from test_importers import write_gguf

NASTY = 'ü "q" \'s\' \\ ??- $HOME `x` ; *'    # a path component: no "/", but "*" + the next "/" makes "*/"
INJECTED = "#error INJECTED"


@pytest.mark.parametrize("name", ['a"b', "a*/b", "a b", "a\nb", "-a", "a/b", "ü", "a;rm -rf"])
def test_spec_names_that_could_reach_code_or_paths_are_refused(name):
    with pytest.raises(Exception) as e:
        parse_spec(yaml.safe_dump({"version": 1, "name": name, "source": {"tiny": {}}}), "s.yaml")
    assert "s.yaml:1: name: must match" in str(e.value) and "\n" not in str(e.value)


def test_build_with_hostile_paths_through_onnx_and_arm64(tmp_path):
    src_dir = tmp_path / f"src {NASTY}"
    src_dir.mkdir()
    gguf = src_dir / f"model\n{INJECTED}\n{NASTY}.gguf"
    write_gguf(make_tiny_ir("mistral", "relu", seed=3, sliding_window=64), gguf)
    spec = tmp_path / "spec dir ü" / "my spec.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({
        "version": 1, "name": "user-strings.1", "source": {"path": str(gguf)}, "pipeline": [{"drelu": {}}],
        "targets": {"onnx": {}, "arm64": {}},
        "verify": {"prompts": [f"{NASTY} {INJECTED}", "ok"], "steps": 4, "speed_tokens": 0,
                   "goals": {"min_top1": 0.99, "max_rel_err": 1e-3}}}, allow_unicode=True))
    bad_out = tmp_path / f"out\n{INJECTED}"
    res = run_cli(["build", str(spec), "--out", str(bad_out), "--dry-run"], cwd=tmp_path)
    assert_one_line_error(res, "a build dir path with a line break")      # gcc cannot take one (its .s breaks)
    out = tmp_path / f"out {NASTY}"
    res = run_cli(["build", str(spec), "--out", str(out)], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "verify.json").read_text())
    assert set(report["targets"]) == {"onnx", "arm64"}
    generated = [p for p in (out / "arm64" / "src").iterdir() if p.suffix in (".c", ".h")]
    assert generated
    for p in generated:
        for line in p.read_text().splitlines():
            assert INJECTED not in line and "*/ ~" not in line, (p.name, line)
    header = (out / "arm64" / "src" / "model.h").read_text().splitlines()[0]
    assert header.startswith("// tsrun: a standalone sparse decoder for ") and "model__error_INJECTED" in header
    res = run_cli(["generate", str(out), "--target", "arm64", "--prompt", NASTY, "--max-new-tokens", "3"],
                  cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith(NASTY), res.stderr[-2000:]
    check_broken_blobs_through_the_runner(out / "arm64")


def check_broken_blobs_through_the_runner(artifact):
    """Broken weights.bin files and out-of-vocabulary token ids through the Python runner (the path of
    `tscompile verify/generate`) into the real runtime: one-line UserErrors."""
    from tscompile import registry
    arm64 = registry.backend("arm64")
    blob = artifact / "weights.bin"
    good = blob.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x40
    broken = {"truncated": (good[:len(good) // 2], ""), "data byte flipped": (bytes(flipped), "checksum"),
              "empty": (b"", ""), "missing": (None, "")}
    for name, (data, needle) in broken.items():
        blob.unlink(missing_ok=True)
        if data is not None:
            blob.write_bytes(data)
        with pytest.raises(UserError) as e:
            arm64.load(artifact, where="host").generate([1, 2], 2)
        assert "tsrun" in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), (name, e.value)
    blob.write_bytes(good)
    runner = arm64.load(artifact, where="host")
    assert len(runner.generate([1, 2], 2)) == 2
    for ids in ([runner.vocab], [1, -1], [2**40]):
        with pytest.raises(UserError) as e:
            runner.generate(ids, 1)
        assert "\n" not in str(e.value), (ids, e.value)


PLANTED = ["evil_plugin", "onnx", "torch", "yaml", "drelu", "tscompile_plugins"]    # modules in the cwd


@pytest.fixture
def planted(tmp_path):
    """A cwd holding modules that record being imported (some shadow real packages or pass names)."""
    for name in PLANTED:
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / ('imported-' + name))!r}, 'w').close()\n")
    return tmp_path


def imported(cwd) -> list[str]:
    return sorted(p.name[len("imported-"):] for p in cwd.glob("imported-*"))


def test_modules_in_the_current_dir_are_not_imported_unless_named(planted):
    assert run_cli(["passes"], cwd=planted).returncode == 0
    res = run_cli(["build", str(ROOT / "specs" / "tiny.yaml"), "--dry-run"], cwd=planted)
    assert res.returncode == 0, res.stderr
    assert imported(planted) == []
    res = run_cli(["passes", "-p", "evil_plugin"], cwd=planted)
    assert res.returncode == 0, res.stderr
    assert imported(planted) == ["evil_plugin"]     # named: imported; the shadowing ones still not


def test_a_spec_plugin_that_does_not_exist_is_one_line(planted):
    spec = planted / "s.yaml"
    spec.write_text("version: 1\nname: x\nsource: {tiny: {}}\nplugins: [no_such_plugin_mod]\n")
    assert_one_line_error(run_cli(["build", str(spec), "--dry-run"], cwd=planted),
                          "s.yaml:4: plugins[0]: plug-in 'no_such_plugin_mod' failed to import")
    assert imported(planted) == []
