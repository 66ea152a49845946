"""Spec loading: every bad spec gives one exact `file:line: yaml.path: message`; good specs resolve and round-trip."""
from __future__ import annotations

import json

import pytest
from tsc_test_plugin import tiny_spec

from tscompile.errors import UserError
from tscompile.spec import json_schema, load_spec, parse_spec

NESTED = """pipeline:
  - scale:
      factor: 2
      stages:
        - {name: warm, lr: 1.0e-3}
        - {name: hot, lr: -1}
"""

# (spec text, exact error). Base layout (tiny_spec): 1 version, 2 name, 3 plugins, 4 source, 5 pipeline, 6 targets.
BAD = {
    "wrong version": (tiny_spec().replace("version: 1", "version: 2"), "x.yaml:1: version: must be 1, got 2"),
    "unknown top-level key": (tiny_spec(extra="verfy: {}\n"), "x.yaml:7: verfy: unknown key; did you mean 'verify'?"),
    "unknown pass": (tiny_spec(pipeline="[scal: {}]"),
                     "x.yaml:5: pipeline[0].scal: unknown pass 'scal'; did you mean 'scale'?"),
    "unknown target": (tiny_spec(targets="{ckp: {}}"),
                       "x.yaml:6: targets.ckp: unknown backend 'ckp'; did you mean 'ckpt'?"),
    "negative lr in a pass config": (tiny_spec(pipeline="[]").replace("pipeline: []\n", NESTED),
                                     "x.yaml:10: pipeline[0].scale.stages[1].lr: must be > 0, got -1"),
    "wrong type": (tiny_spec(extra="seed: abc\n"), "x.yaml:7: seed: must be an integer, got 'abc'"),
    "missing name": (tiny_spec().replace("name: t\n", ""), "x.yaml:1: name: required key is missing"),
    "bad YAML syntax": (tiny_spec(pipeline="[scale: {factor: 2}"),
                        "x.yaml:6: YAML syntax error: expected ',' or ']', but got '<scalar>'"),
    "pipeline item with two keys": (tiny_spec(pipeline="[{scale: {}, after_scale: {}}]"),
                                    "x.yaml:5: pipeline[0]: must be one {pass: config} mapping, "
                                    "got 2 keys (scale, after_scale)"),
    "source with path and tiny": (tiny_spec().replace("source: {tiny:", "source: {path: 'pypi:x', tiny:"),
                            "x.yaml:4: source: give exactly one of 'path' or 'tiny'"),
    "source path not found": ("version: 1\nname: t\nsource:\n  path: no/such/model.gguf\n",
                              "x.yaml:4: source.path: file not found: no/such/model.gguf"),
    "source dir without a checkpoint": ("version: 1\nname: t\nsource:\n  path: .\n",
                                        "x.yaml:4: source.path: .: not a checkpoint directory (no config.json)"),
    "source file that is not GGUF": ("version: 1\nname: t\nsource:\n  path: x.yaml\n",
                                     "x.yaml:4: source.path: x.yaml: not a checkpoint directory, GGUF file or "
                                     "pypi:PACKAGE source"),
    "home of an unknown user": ("".join("source: {path: ~tsc_no_such_user/m}\n" if line.startswith("source:")
                                        else line for line in tiny_spec().splitlines(keepends=True)),
                                "x.yaml:4: source.path: ~tsc_no_such_user/m: no home directory for "
                                "~tsc_no_such_user"),
    "negative seed": (tiny_spec(extra="seed: -1\n"), "x.yaml:7: seed: must be >= 0, got -1"),
    "seed too big for the generators": (tiny_spec().replace("vocab: 300", "vocab: 300, seed: 99999999999999999999"),
                                        "x.yaml:4: source.tiny.seed: must be < 9223372036854775808, got "
                                        "99999999999999999999"),
    "bad tiny family": (tiny_spec().replace("family: llama", "family: gpt2"),
                        "x.yaml:4: source.tiny.family: must be 'llama', 'mistral', 'qwen2' or 'mixtral', got 'gpt2'"),
    "tiny heads do not divide hidden": (tiny_spec().replace("heads: 2", "heads: 3"),
                                        "x.yaml:4: source.tiny.heads: must divide hidden (32) into an even head size"),
    "bad goal value": (tiny_spec(extra="verify:\n  goals: {min_top1: 1.5}\n"),
                       "x.yaml:8: verify.goals.min_top1: must be <= 1, got 1.5"),
    "speedup goal for a target not built": (tiny_spec(targets="{ckpt: {}}", extra="verify:\n  goals:\n"
                                                      "    min_speedup: {ckp: 2}\n"),
                                            "x.yaml:9: verify.goals.min_speedup.ckp: 'ckp' is not a target of this "
                                            "spec; did you mean 'ckpt'?"),
    "NaN goal": (tiny_spec(extra="verify: {goals: {max_rel_err: .nan}}\n"),
                 "x.yaml:7: verify.goals.max_rel_err: must be a finite number"),
    "bad data weight": (tiny_spec(extra="data:\n  train:\n    mixture:\n      - {path: corpus:prose, weight: 0}\n"),
                        "x.yaml:10: data.train.mixture[0].weight: must be > 0, got 0"),
    "unknown key in a pass config": (tiny_spec(pipeline="[scale: {factr: 2}]"),
                                     "x.yaml:5: pipeline[0].scale.factr: unknown key; did you mean 'factor'?"),
    "wrong type in a target config": (tiny_spec(targets="{ckpt: {dtype: int4}}"),
                                      "x.yaml:6: targets.ckpt.dtype: must be 'float32' or 'float16', got 'int4'"),
    "duplicate key": (tiny_spec(extra="seed: 1\nseed: 2\n"), "x.yaml:8: seed: duplicate key"),
    "top level is a list": ("- version: 1\n- name: t\n",
                            "x.yaml:1: (top level): the spec must be a mapping of keys, got list"),
    "empty file": ("# nothing\n", "x.yaml:1: (top level): the spec is empty"),
    "plug-in fails to import": (tiny_spec().replace("[tsc_test_plugin]", "[tsc_test_plugin, no_such_plugin_mod]"),
                                "x.yaml:3: plugins[1]: plug-in 'no_such_plugin_mod' failed to import: "
                                "ModuleNotFoundError: No module named 'no_such_plugin_mod'"),
    "name with a slash": (tiny_spec().replace("name: t", "name: a/b"),
                          "x.yaml:2: name: must match ^[A-Za-z0-9][A-Za-z0-9._-]*$, got 'a/b'"),
    "pipeline is a mapping": (tiny_spec(pipeline="{scale: {}}"),
                              "x.yaml:5: pipeline: must be a list of {pass: config} items, got {\"scale\": {}}"),
    "prompts file missing": (tiny_spec(extra="verify:\n  prompts: prompts/none.txt\n"),
                             "x.yaml:8: verify.prompts: file not found: prompts/none.txt"),
    "union field, no member fits": (tiny_spec(pipeline="[predictors: {rank: 0}]"),
                                    "x.yaml:5: pipeline[0].predictors.rank: must be > 0 or 'auto', got 0"),
    "union field, inside the member that fits": (tiny_spec(pipeline="[relufy: {stages: [{name: a, steps: 1, "
                                                          "l1: {schedule: sine, to: .nan}}]}]"),
                                                 "x.yaml:5: pipeline[0].relufy.stages[0].l1.to: must be a finite "
                                                 "number"),
    "union field, a scalar for either": (tiny_spec(pipeline="[relufy: {stages: [{name: a, steps: 1, l1: x}]}]"),
                                         "x.yaml:5: pipeline[0].relufy.stages[0].l1: must be a number or a "
                                         "mapping, got 'x'"),
    "two errors": (tiny_spec(pipeline="[scale: {factor: 0}]", extra="seed: x\n"),
                   "x.yaml:5: pipeline[0].scale.factor: must be > 0, got 0 (and 1 more error)"),
}


BAD |= {   # spec errors the build would otherwise meet only once running
    "misspelt corpus": (tiny_spec(extra='data:\n  calib: {path: "corpus:prosee"}\n'),
                        "x.yaml:8: data.calib.path: corpus:prosee: unknown corpus 'prosee'; "
                        "did you mean 'prose'?"),
    "bad corpus split": (tiny_spec(extra="data:\n  eval:\n    texts: {p: corpus:prose@test}\n"),
                         "x.yaml:9: data.eval.texts: p: corpus:prose@test: expected corpus:NAME, corpus:NAME@train "
                         "or corpus:NAME@heldout"),
    "unknown eval corpus": (tiny_spec(extra="data:\n  eval:\n    texts: {p: corpus:nope@heldout}\n"),
                            "x.yaml:9: data.eval.texts: p: corpus:nope@heldout: unknown corpus 'nope' "
                            "(known: prose, code, docs, dict, math)"),
    "held-out split as calibration data": (tiny_spec(extra="data:\n  calib:\n    mixture:\n"
                                                     "      - {path: corpus:code@heldout}\n"),
                                           "x.yaml:10: data.calib.mixture[0].path: corpus:code@heldout: a held-out "
                                           "corpus split cannot be used as training or calibration data"),
    "error bound for a target not built": (tiny_spec(targets="{ckpt: {}}", extra="verify:\n  goals:\n"
                                                     "    max_rel_err_by_target: {onxx: 3.0e-2}\n"),
                                           "x.yaml:9: verify.goals.max_rel_err_by_target.onxx: 'onxx' is not a "
                                           "target of this spec (known: ckpt)"),
    "speedup goal in a spec without targets": (tiny_spec(extra="verify:\n  goals:\n    min_speedup: {onnx: 2}\n"),
                                               "x.yaml:9: verify.goals.min_speedup.onnx: 'onnx' is not a target "
                                               "of this spec (it has no targets)"),
    "speedup goal without speed measurement": (tiny_spec(targets="{ckpt: {}}", extra="verify:\n  speed_tokens: 0\n"
                                                         "  goals:\n    min_speedup: {ckpt: 2}\n"),
                                               "x.yaml:8: verify.speed_tokens: must be > 0 when goals.min_speedup "
                                               "is set (0 measures no speed)"),
    "perplexity goal without eval texts": (tiny_spec(extra="verify:\n  goals: {max_ppl_ratio: 1.1}\n"),
                                           "x.yaml:8: verify.goals.max_ppl_ratio: needs data.eval: perplexity is "
                                           "measured on its texts, and this spec has none"),
    "eval windows of one token": (tiny_spec(extra="data:\n  eval: {texts: {p: corpus:prose@heldout}, seq_len: 1}\n"),
                                  "x.yaml:8: data.eval.seq_len: must be >= 2, got 1"),
    "calibration windows of one token": (tiny_spec(extra="data:\n  calib: {path: corpus:prose, seq_len: 1}\n"),
                                         "x.yaml:8: data.calib.seq_len: must be >= 2, got 1"),
    "AdamW beta of 1 or more": (tiny_spec(pipeline="[relufy: {betas: [0.9, 1.5], stages: [{name: a, steps: 1}]}]"),
                                "x.yaml:5: pipeline[0].relufy.betas[1]: must be < 1, got 1.5"),
    "a device as calibration text": (tiny_spec(extra="data:\n  calib: {path: /dev/zero}\n"),
                                     "x.yaml:8: data.calib.path: not a regular file or a directory: /dev/zero"),
    "huge tiny vocab": (tiny_spec().replace("vocab: 300", "vocab: 50000000"),
                        "x.yaml:4: source.tiny.vocab: must be <= 262144, got 50000000"),
    "tiny model too big in all": (tiny_spec().replace("hidden: 32, intermediate: 64", "hidden: 8192, "
                                                      "intermediate: 32768"),
                                  "x.yaml:4: source.tiny: a tiny model of about 1079M parameters is not tiny "
                                  "(at most 268M: lower layers, hidden, intermediate or vocab)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_one_exact_line(case, tmp_path, monkeypatch):
    text, want = BAD[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        load_spec("x.yaml")
    assert str(e.value) == want


@pytest.mark.parametrize("data", ["calib: {path: texts}", "eval: {texts: {p: texts}}"])
def test_text_directory_without_text_is_a_spec_error(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "weights.bin").write_bytes(b"\0" * 64)
    (tmp_path / "texts" / "empty.txt").write_text("")
    (tmp_path / "x.yaml").write_text(tiny_spec(extra=f"data:\n  {data}\n"))
    where = "data.calib.path: " if data.startswith("calib") else "data.eval.texts: p: "
    with pytest.raises(UserError) as e:
        load_spec("x.yaml")
    assert str(e.value) == f"x.yaml:8: {where}directory holds no text files: texts"
    (tmp_path / "texts" / "a.txt").write_text("now some text\n")
    load_spec("x.yaml")


def test_missing_spec_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^nope\.yaml: spec file not found$"):
        load_spec("nope.yaml")
    with pytest.raises(UserError, match=r"^/dev/zero: not a regular file$"):   # it would be read forever
        load_spec("/dev/zero")


def test_good_spec_defaults_and_typed_configs():
    spec = parse_spec(tiny_spec(pipeline="[scale: {factor: 2, stages: [{lr: 0.01}]}, after_scale]",
                                targets="{ckpt: {dtype: float16}}"), "s.yaml")
    assert [s.name for s in spec.pipeline] == ["scale", "after_scale"]
    cfg = spec.pipeline[0].config
    assert type(cfg).__name__ == "ScaleConfig" and cfg.factor == 2.0 and cfg.stages[0].lr == 0.01
    assert cfg.stages[0].steps == 10                                   # a default inside a nested config
    assert spec.pipeline[1].config.bias == 0.5
    assert spec.targets["ckpt"].dtype == "float16"
    assert spec.source.tiny.hidden == 32 and spec.source.tiny.family == "llama"
    assert spec.seed == 0 and spec.data is None and spec.verify.steps == 32 and spec.verify.prompts == []


def test_resolved_yaml_round_trips_with_paths_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "prompts.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "specs" / "calib.txt").write_text("some text\n")
    spec_file = tmp_path / "specs" / "s.yaml"
    spec_file.write_text(tiny_spec(pipeline="[scale: {factor: 3}]", extra=(
        "data: {calib: {path: calib.txt, tokens: 100}, train: {mixture: [{path: corpus:prose, weight: 2}]}}\n"
        "verify: {prompts: prompts.txt, goals: {min_top1: 0.9, max_rel_err: 1e-3}}\n")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                       # relative paths fall back to the spec's directory
    spec = load_spec(spec_file)
    assert spec.verify.prompts == ["first prompt", "second prompt"]
    assert spec.data.calib.mixture[0].path == str(tmp_path / "specs" / "calib.txt")
    assert spec.data.train.mixture[0].path == "corpus:prose" and spec.data.train.mixture[0].weight == 2
    assert spec.verify.goals.max_rel_err == 1e-3       # YAML 1.1 reads 1e-3 as a string; the model converts it
    again = parse_spec(spec.to_yaml(), "resolved.yaml")
    assert again.model_dump(mode="json") == spec.model_dump(mode="json")
    assert again.pipeline[0].config.factor == 3.0


def test_error_at_points_into_the_file():
    spec = parse_spec(tiny_spec(pipeline="\n  - scale: {}\n  - after_scale: {}"), "p.yaml")
    assert str(spec.error_at(("pipeline", 1, "after_scale"), "boom")) == "p.yaml:7: pipeline[1].after_scale: boom"


def test_schema_holds_every_pass_and_target_config():
    parse_spec(tiny_spec(), "s.yaml")          # loads the test plug-in
    schema = json_schema()
    json.dumps(schema)
    items = schema["properties"]["pipeline"]["items"]["oneOf"]
    by_name = {next(iter(i["properties"])): i for i in items}
    assert {"scale", "after_scale", "prune_neurons"} <= set(by_name)
    scale_ref = by_name["scale"]["properties"]["scale"]["$ref"].split("/")[-1]
    assert set(schema["$defs"][scale_ref]["properties"]) == {"factor", "stages", "pause"}
    assert schema["$defs"][scale_ref]["additionalProperties"] is False
    assert "ckpt" in schema["properties"]["targets"]["properties"]
    assert schema["properties"]["version"]["const"] == 1
    assert "Step" not in schema["$defs"]


# Mistakes a dry run must catch (each used to pass it and fail mid-build or at verification, or be ignored).


def test_corpus_paths_that_the_build_reads_pass():
    spec = parse_spec(tiny_spec(targets="{ckpt: {}}", extra=(
        "data:\n  train: {path: corpus:code@train}\n  calib: {path: corpus:prose}\n"
        "  eval: {texts: {p: corpus:prose@heldout, c: corpus:code}}\n"
        "verify:\n  speed_tokens: 0\n  goals: {max_rel_err_by_target: {ckpt: 0.1}}\n")), "x.yaml")
    assert spec.data.eval.texts == {"p": "corpus:prose@heldout", "c": "corpus:code"}


def test_the_resolved_spec_writes_aliased_keys_as_the_spec_does():   # L1Ramp's `from` (from_ in Python)
    ramp = "{schedule: sine, from: 0.5, to: 1}"
    spec = parse_spec(tiny_spec(pipeline=f"[relufy: {{stages: [{{name: a, steps: 1, l1: {ramp}}}]}}]"), "x.yaml")
    again = parse_spec(spec.to_yaml(), "y.yaml")
    assert "from: 0.5" in spec.to_yaml() and again.pipeline[0].config.stages[0].l1.from_ == 0.5
