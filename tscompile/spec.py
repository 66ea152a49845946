"""The build spec: one pydantic model, loaded from YAML, every error reported as `file:line: yaml.path: message`.

Validation runs in two layers. The Spec model checks the fixed shape (version, name, source, data, verify).
Pipeline items and targets are checked against the config class of the pass/backend they name, looked up in
the registry (after importing the spec's `plugins:`). Pydantic's error locations are mapped to YAML lines
through the node tree from `yaml.compose`, so every message points at the line to fix.

Relative paths in a spec (source.path, data paths, a prompts file) are looked up in the current directory
first, then beside the spec file; the resolved spec (`spec.resolved.yaml`) holds them absolute and the
prompts inline, so it can be re-read from anywhere.
"""
from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, SerializeAsAny,
                      ValidationError, ValidationInfo, field_validator, model_serializer, model_validator)

from . import registry
from .api import PassConfig
from .data import parse_corpus_path, text_files
from .errors import UserError
from .sources import SourceSpec, resolve_local_path

Loc = tuple  # a YAML path: ("pipeline", 2, "relufy", "stages", 0, "lr")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def resolve_text_path(text: str, info: ValidationInfo) -> str:
    """A text path of the spec: corpus:NAME[@train|@heldout] naming a known corpus (built on first use, so
    checked here by name), or a local file or directory made absolute (see `resolve_local_path`)."""
    if not text.startswith("corpus:"):
        path = Path(resolve_local_path(text, info))
        try:
            if not (path.is_file() or path.is_dir()):   # a device or a FIFO
                raise ValueError(f"not a regular file or a directory: {text}")
            if path.is_dir() and next(text_files(path), None) is None:
                raise ValueError(f"directory holds no text files: {text}")
        except OSError as e:
            raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
        return str(path)
    try:
        parse_corpus_path(text)
    except UserError as e:
        raise ValueError(str(e)) from None
    return text


class TextSource(Strict):
    """A training or calibration source (both read the train split of a corpus)."""
    path: str                              # a file, a directory, or corpus:NAME[@train]
    weight: PositiveFloat = 1.0

    @field_validator("path")
    @classmethod
    def _text_path(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith("corpus:") and v.endswith("@heldout"):
            raise ValueError(f"{v}: a held-out corpus split cannot be used as training or calibration data")
        return resolve_text_path(v, info)


class Mixture(Strict):
    """Weighted text sources; `{path: X}` is shorthand for `{mixture: [{path: X}]}`."""
    mixture: list[TextSource] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, data):
        if isinstance(data, dict) and "path" in data and "mixture" not in data:
            data = dict(data)
            data["mixture"] = [{"path": data.pop("path")}]
        return data


class TrainData(Mixture):
    seq_len: PositiveInt = 1024                 # relufy trains on windows of seq_len + 1 tokens
    held_out: float = Field(0.02, ge=0, lt=1)   # fraction of each source kept out of training


class CalibData(Mixture):
    tokens: PositiveInt = 65536
    seq_len: int = Field(512, ge=2)             # held-out perplexity needs a token and its successor


class EvalData(Strict):
    texts: dict[str, str] = Field(min_length=1)   # label -> text path (corpus:NAME@heldout, file, dir)
    tokens: int = Field(4096, ge=2)               # perplexity needs a token and its successor
    seq_len: int = Field(1024, ge=2)

    @field_validator("texts")
    @classmethod
    def _text_paths(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        out = {}
        for k, p in v.items():
            try:
                out[k] = resolve_text_path(p, info)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return out


class DataSpec(Strict):
    train: TrainData | None = None
    calib: CalibData | None = None
    eval: EvalData | None = None


class Goals(Strict):
    min_top1: float | None = Field(None, ge=0, le=1)      # greedy top-1 agreement with the reference
    max_rel_err: PositiveFloat | None = None              # relative L2 error of logits
    max_rel_err_by_target: dict[str, PositiveFloat] = {}  # target -> its own bound (e.g. a bf16 target)
    max_ppl_ratio: PositiveFloat | None = None            # perplexity of the built model / source model
    min_speedup: dict[str, PositiveFloat] = {}               # target -> decode speed vs its dense build


class VerifySpec(Strict):
    prompts: list[str] = []                    # empty: the verifier's default prompts
    steps: PositiveInt = 32                    # teacher-forced / greedy tokens per prompt
    speed_tokens: int = Field(32, ge=0)        # decode tokens per speed sample (0: no speed measurement)
    repeats: PositiveInt = 3                   # speed samples, sparse and dense interleaved
    goals: Goals = Goals()

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_file(cls, v, info: ValidationInfo):
        if isinstance(v, str):     # a text file, one prompt per line
            path = Path(resolve_local_path(v, info))
            if not path.is_file():          # a directory, or a device such as /dev/zero that never ends
                raise ValueError(f"not a regular file: {v}")
            lines = path.read_text().splitlines()
            v = [line for line in lines if line.strip()]
            if not v:
                raise ValueError("the prompts file has no non-empty line")
        return v


class Step(BaseModel):
    """One pipeline item: a pass name and its validated config. Written back as `{name: config}`."""
    model_config = ConfigDict(frozen=True)
    name: str
    config: SerializeAsAny[PassConfig]

    @model_serializer
    def _as_yaml_item(self) -> dict:
        return {self.name: self.config.model_dump(mode="json", by_alias=True)}   # L1Ramp.from_ as `from`


class Spec(Strict):
    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    source: SourceSpec
    plugins: list[str] = []
    seed: int = Field(0, ge=0, lt=2**63)   # numpy and torch generators take 0 .. 2^63 - 1
    data: DataSpec | None = None
    pipeline: list[Step] = []
    targets: dict[str, SerializeAsAny[PassConfig]] = {}
    verify: VerifySpec = VerifySpec()

    _origin: SpecOrigin | None = PrivateAttr(None)

    def error_at(self, loc: Loc, message: str) -> UserError:
        """A UserError pointing at a place in the spec file (for checks made after loading)."""
        if self._origin is None:
            return UserError(f"spec: {format_loc(loc)}: {message}")
        return self._origin.error(loc, message)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---- locating errors in the YAML text ---------------------------------------------------------------


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class SpecOrigin:
    """The spec file and its YAML node tree: turns a location into `file:line: path`."""

    def __init__(self, file: str, root: yaml.Node | None):
        self.file, self.root = file, root

    def line(self, loc: Loc) -> int:
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                # the last of duplicate keys: the one PyYAML keeps
                hit = next(((k, v) for k, v in reversed(node.value) if k.value == str(part)), None)
                if hit is None:
                    break
                line, node = hit[0].start_mark.line + 1, hit[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def where(self, loc: Loc) -> str:
        return f"{self.file}:{self.line(loc)}: {format_loc(loc)}"

    def error(self, loc: Loc, message: str) -> UserError:
        return UserError(printable(f"{self.where(loc)}: {message}"))


def printable(text: str) -> str:
    """Line breaks and control characters (from keys or values in the spec) escaped: a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _duplicate_keys(node: yaml.Node, loc: Loc = ()) -> list[tuple[Loc, str, int]]:
    """PyYAML keeps the last of two equal keys silently; a spec with one is almost surely a mistake."""
    out = []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if k.value in seen:
                out.append((loc + (k.value,), "duplicate key", k.start_mark.line + 1))
            seen.add(k.value)
            out += _duplicate_keys(v, loc + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, loc + (i,))
    return out


# ---- pydantic errors as one-line messages -----------------------------------------------------------


def _model_at(model: type[BaseModel] | None, path: Loc) -> type[BaseModel] | None:
    """The model class that validates the mapping at `path` under `model`, if it can be told."""
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _first_model(field.annotation) if field else None
    return model


def _first_model(tp) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KIND = {"dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
         "list_type": "a list", "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
         "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
         "bool_parsing": "true or false"}


def pydantic_message(err: dict, model: type[BaseModel] | None) -> str:
    """One pydantic error as a short message (the location is printed separately)."""
    kind, ctx, loc = err["type"], err.get("ctx") or {}, err["loc"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = list(parent.model_fields) if parent else []
        return "unknown key" + (registry.suggest(str(loc[-1]), allowed) if allowed else "")
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
              "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {op} {bound}, got {_show(err['input'])}"
    if kind in _KIND:
        return f"must be {_KIND[kind]}, got {_show(err['input'])}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_show(err['input'])}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}, got {_show(err['input'])}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    return "must be " + msg[len("Input should be "):] if msg.startswith("Input should be ") else msg


def _without_union_tags(loc: Loc, data: Any, missing: bool) -> tuple[Loc, int | None]:
    """loc with only the parts that are keys or indexes of the input: without the names pydantic gives a union's
    members (`rank.constrained-int`) or the keys a validator added (`calib: {path: P}` is read as `mixture:
    [{path: P}]`), so that it names what the spec says. Also where the first dropped part was (None: none)."""
    out, node, tag_at = [], data, None
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1 and isinstance(node, dict)):   # a missing key is not in the input
            tag_at = len(out) if tag_at is None else tag_at
            continue
        out.append(part)
    return tuple(out), tag_at


def _either(messages: list[str]) -> str:
    """The messages of a union's members about one value as one: "must be A or B, got X"."""
    parts = [re.fullmatch(r"must be (.*), got (.*)", m) for m in messages]
    if all(parts) and len({p[2] for p in parts}) == 1:
        return f"must be {' or '.join(dict.fromkeys(p[1] for p in parts))}, got {parts[0][2]}"
    return "; or ".join(dict.fromkeys(messages))


def _pydantic_errors(e: ValidationError, prefix: Loc, model: type[BaseModel], data: Any) -> list[tuple[Loc, str]]:
    """One (loc, message) per error; errors from the members of a union field are reduced to those of the member
    that matched the input's shape (it failed inside the value), else merged into one message at the field."""
    out, unions = [], {}   # unions: field loc -> [(loc, message)]
    for err in e.errors():
        loc, tag_at = _without_union_tags(tuple(err["loc"]), data, err["type"] == "missing")
        message = pydantic_message({**err, "loc": loc}, model)
        if tag_at is None:
            out.append((prefix + loc, message))
        else:
            unions.setdefault(loc[:tag_at], []).append((loc, message))
    for field, errors in unions.items():
        inside = [(prefix + loc, m) for loc, m in errors if len(loc) > len(field)]
        out += inside or [(prefix + field, _either([m for _, m in errors]))]
    return out


# ---- loading ----------------------------------------------------------------------------------------


def _validate_named(items: dict, loc: Loc, lookup, errors: list) -> dict[str, PassConfig]:
    """name -> config instance, validated by the config class of the registered pass/backend."""
    out = {}
    for name, cfg in items.items():
        where = loc + (str(name),)
        try:
            info = lookup(str(name))
        except UserError as e:
            errors.append((where, str(e)))
            continue
        try:
            out[str(name)] = info.config.model_validate({} if cfg is None else cfg)
        except ValidationError as e:
            errors += _pydantic_errors(e, where, info.config, cfg)
    return out


def _validate_pipeline(raw: Any, errors: list) -> list[Step]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.append((("pipeline",), f"must be a list of {{pass: config}} items, got {_show(raw)}"))
        return []
    steps = []
    for i, item in enumerate(raw):
        if isinstance(item, str):                       # "- drelu" means "- drelu: {}"
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            got = f"{len(item)} keys ({', '.join(map(str, item))})" if isinstance(item, dict) else _show(item)
            errors.append((("pipeline", i), f"must be one {{pass: config}} mapping, got {got}"))
            continue
        for name, cfg in _validate_named(item, ("pipeline", i), registry.pass_info, errors).items():
            steps.append(Step(name=name, config=cfg))
    return steps


def _validate_targets(raw: Any, errors: list) -> dict[str, PassConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append((("targets",), f"must be a mapping of target: config, got {_show(raw)}"))
        return {}
    return _validate_named(raw, ("targets",), registry.backend, errors)


def _load_plugins(raw: Any, errors: list) -> None:
    if not isinstance(raw, list):
        return                      # the Spec model reports the wrong type
    for i, module in enumerate(raw):
        if isinstance(module, str):
            try:
                registry.load_plugin(module)
            except UserError as e:
                errors.append((("plugins", i), str(e)))


def _goal_errors(spec: Spec) -> list[tuple[Loc, str]]:
    """Goals that name a target the spec does not build, or that cannot be measured."""
    goals, out = spec.verify.goals, []
    for goal in ("min_speedup", "max_rel_err_by_target"):
        for target in getattr(goals, goal):
            if target not in spec.targets:
                hint = registry.suggest(target, list(spec.targets)) if spec.targets else " (it has no targets)"
                out.append((("verify", "goals", goal, target),
                            f"{target!r} is not a target of this spec{hint}"))
    if goals.min_speedup and spec.verify.speed_tokens == 0:
        out.append((("verify", "speed_tokens"),
                    "must be > 0 when goals.min_speedup is set (0 measures no speed)"))
    if goals.max_ppl_ratio is not None and (spec.data is None or spec.data.eval is None):
        out.append((("verify", "goals", "max_ppl_ratio"),
                    "needs data.eval: perplexity is measured on its texts, and this spec has none"))
    return out


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader refusing what would hang or crash the checks below: nesting deeper than PyYAML's recursive
    composer can take, an alias inside its own anchor (a cycle), and aliases expanding to a huge tree."""
    max_depth, max_nodes = 64, 100_000
    _depth = _nodes = 0
    _open: frozenset = frozenset()      # anchors whose node is being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self._depth >= self.max_depth:
            self._refuse(f"nested deeper than {self.max_depth} levels", event)
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent) and anchor in self._open:
            self._refuse(f"alias *{anchor} refers to itself", event)
        opened = self._open
        self._open, self._depth = opened | {anchor}, self._depth + 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open, self._depth = opened, self._depth - 1
        self._nodes += _tree_size(node) if isinstance(event, yaml.AliasEvent) else 1
        if self._nodes > self.max_nodes:
            self._refuse(f"the spec expands to more than {self.max_nodes} YAML nodes", event)
        return node

    def _refuse(self, problem: str, event) -> None:
        raise yaml.composer.ComposerError(None, None, problem, event.start_mark)


def _tree_size(node: yaml.Node, memo: dict | None = None) -> int:
    """Nodes in the tree an alias stands for (shared subtrees counted each time they appear)."""
    memo = {} if memo is None else memo
    if id(node) not in memo:
        kids = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        memo[id(node)] = 1 + sum(_tree_size(k, memo) for k in kids)
    return memo[id(node)]


def parse_spec(text: str, file: str = "spec", spec_dir: str | None = None) -> Spec:
    """Validate spec text; any problem raises UserError `file:line: yaml.path: message`."""
    try:
        loader = _SpecLoader(text)
        try:    # one parse: the node tree (for lines) and the data built from it
            root = loader.get_single_node()
            data = None if root is None else loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(str(e.problem or e.context or "").split())
        raise UserError(f"{file}:{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as e:     # a control character: it carries a position, not a line
        line = text.count("\n", 0, e.position) + 1
        raise UserError(f"{file}:{line}: YAML syntax error: unacceptable character #x{e.character:04x}") from None
    origin = SpecOrigin(file, root)
    if data is None:
        raise origin.error((), "the spec is empty")
    if not isinstance(data, dict):
        raise origin.error((), f"the spec must be a mapping of keys, got {type(data).__name__}")
    errors = _duplicate_keys(root)                 # (loc, message, line)
    other_errors: list[tuple[Loc, str]] = []       # (loc, message): the line comes from the node tree
    _load_plugins(data.get("plugins"), other_errors)
    fields = dict(data)
    fields["pipeline"] = _validate_pipeline(data.get("pipeline"), other_errors)
    fields["targets"] = _validate_targets(data.get("targets"), other_errors)
    spec = None
    try:
        spec = Spec.model_validate(fields, context={"spec_dir": spec_dir})
    except ValidationError as e:
        other_errors += _pydantic_errors(e, (), Spec, fields)
    if spec is not None:
        other_errors += _goal_errors(spec)
    errors += [(loc, message, origin.line(loc)) for loc, message in other_errors]
    if errors:
        loc, message, line = min(errors, key=lambda e: e[2])
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserError(printable(f"{file}:{line}: {format_loc(loc)}: {message}{more}"))
    spec._origin = origin
    return spec


def load_spec(path: str | os.PathLike) -> Spec:
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():   # a device or a FIFO would be read forever
        raise UserError(f"{p}: not a regular file")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{p}: spec file not found") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, not a spec file") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file") from None
    return parse_spec(text, str(path), str(p.resolve().parent))


# ---- JSON Schema ------------------------------------------------------------------------------------


def json_schema() -> dict:
    """The Spec's JSON Schema, with every registered pass's and target's config schema in place."""
    from pydantic.json_schema import models_json_schema
    passes, _ = registry.all_passes()
    backends, _ = registry.all_backends()
    models = [(Spec, "validation")] + [(i.config, "validation") for i in [*passes.values(), *backends.values()]]
    refs, top = models_json_schema(list(dict.fromkeys(models)), ref_template="#/$defs/{model}")
    defs = top["$defs"]
    root = dict(defs.pop(refs[(Spec, "validation")]["$ref"].split("/")[-1]))
    props = dict(root["properties"])
    props["pipeline"] = {
        "type": "array", "description": "Passes in order; each item is {pass_name: config}.",
        "items": {"oneOf": [{"type": "object", "properties": {n: refs[(i.config, "validation")]},
                             "required": [n], "additionalProperties": False, "description": i.doc}
                            for n, i in passes.items()]}}
    props["targets"] = {
        "type": "object", "description": "Backends to lower to, each with its config.",
        "properties": {n: dict(refs[(i.config, "validation")], description=i.doc) for n, i in backends.items()},
        "additionalProperties": False}
    root["properties"] = props
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "tscompile spec", **root}
    used = _reachable_defs(root, defs)
    root["$defs"] = {k: v for k, v in defs.items() if k in used}
    return root


def _reachable_defs(root: dict, defs: dict) -> set[str]:
    """Names in $defs reachable from root (the Step and PassConfig placeholders are not)."""
    seen, todo = set(), [root]
    while todo:
        text = json.dumps(todo.pop())
        for name in defs:
            if name not in seen and f'"#/$defs/{name}"' in text:
                seen.add(name)
                todo.append(defs[name])
    return seen
