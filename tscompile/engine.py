"""The build: check the whole plan, run the pipeline through the cache, lower each target, verify.

`plan_build` does every check that needs no computation (unknown names were already caught by the spec;
here: `requires` order, data and GPU needs, target selection) and works out each step's cache key and
whether it is cached. `run_build` executes a plan: it loads the latest cached pass output and runs only
the passes after it, then writes model/, spec.resolved.yaml and every target that is not cached.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import cache, registry
from .api import BackendInfo, Context, PassConfig, PassInfo
from .errors import UserError
from .sources import describe_source, load_source, source_key, tree_hash, worth_caching
from .spec import Spec
from .verify import file_digests, skipped_targets

log = logging.getLogger("tscompile")
DATA_SECTIONS = {"train": "training text", "calib": "calibration text"}    # the spec.data sections passes read


@dataclass
class PlannedStep:
    label: str                     # "source" or the pass name
    key: str
    cached: bool                   # a usable cache entry exists (under the build's policy)
    info: PassInfo | None = None   # None for the source
    config: PassConfig | None = None


@dataclass
class PlannedTarget:
    name: str
    info: BackendInfo
    config: PassConfig
    key: str
    cached: bool
    toolchain: str   # the backend's optional tools here (in the key; BackendInfo.toolchain)


@dataclass
class Plan:
    spec: Spec
    build_dir: Path
    policy: str
    source: PlannedStep
    steps: list[PlannedStep]
    targets: list[PlannedTarget]
    verify: bool

    @property
    def final_key(self) -> str:
        return (self.steps[-1] if self.steps else self.source).key


@dataclass
class BuildResult:
    build_dir: Path
    ran: list[str] = field(default_factory=list)        # steps and targets computed in this run
    reused: list[str] = field(default_factory=list)     # steps and targets taken from the cache
    seconds: float = 0.0
    verify: dict | None = None


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _data_sections(info: PassInfo, cfg: PassConfig) -> tuple[str, ...]:
    """The spec.data sections a step reads. needs_data=True does not say which: count every one passes read
    (data.eval is read by the verifier only)."""
    declared = tuple(DATA_SECTIONS) if info.needs_data is True else tuple(info.needs_data or ())
    sections = cfg.data_sections(declared)
    unknown = [s for s in sections if s not in DATA_SECTIONS]
    if unknown:
        raise UserError(f"pass {info.name}: needs_data names {unknown[0]!r}; passes read "
                        f"{' or '.join(DATA_SECTIONS)}")
    return sections


def _data_key(spec: Spec, sections: tuple[str, ...], memo: Path | None, write_memo: bool,
              dry_run: bool) -> dict | None:
    """What a step reads of spec.data: those sections as written, and the content of their files and corpora
    (a dry run builds no corpus: one not built yet keys as unknown, so its step plans to run)."""
    out = {}
    for name in sections:
        section = getattr(spec.data, name, None)
        if section is not None:
            out[name] = {"spec": section.model_dump(mode="json"),
                         "files": {s.path: _text_digest(s.path, memo, write_memo, dry_run) for s in section.mixture}}
    return out or None


def _text_digest(path: str, memo: Path | None, write_memo: bool, dry_run: bool = False) -> str | None:
    """What identifies a text path's content in cache keys: a corpus's file digests, else the files' sha256."""
    from .data import corpus_digest
    if path.startswith("corpus:"):
        return corpus_digest(path, build=not dry_run)
    return tree_hash(Path(path), memo, write_memo)


def _memo_file(build_dir: Path, policy: str) -> Path | None:
    """Where file digests are memoized by (path, size, mtime); None when the cache policy reads nothing."""
    return build_dir / ".cache" / "file-hashes.json" if cache.reads(policy) else None


def _step_key(prev: str, spec: Spec, info: PassInfo, cfg: PassConfig, data: dict | None) -> str:
    return cache.chain_key(prev, "pass", info.name, info.version, cfg.model_dump(mode="json"), spec.seed, data)


def _target_key(model_key: str, name: str, version: str, config: dict, toolchain: str) -> str:
    return cache.chain_key(model_key, "target", name, version, config, toolchain)


def _select_targets(spec: Spec, names: list[str] | None) -> list[tuple[str, BackendInfo, PassConfig]]:
    out = []
    for name in dict.fromkeys(names) if names else spec.targets:
        if name in spec.targets:
            out.append((name, registry.backend(name), spec.targets[name]))
            continue
        try:
            info = registry.backend(name)
        except UserError as e:
            raise UserError(f"--target {name}: {e}") from None
        try:
            out.append((name, info, info.config()))
        except ValidationError as e:
            missing = ", ".join(str(err["loc"][0]) for err in e.errors())
            raise UserError(f"--target {name}: not in the spec and its config needs {missing}; "
                            "add it under targets:") from None
    return out


def plan_build(spec: Spec, out_dir: Path | None = None, targets: list[str] | None = None, policy: str = "on",
               verify: bool = True, dry_run: bool = False) -> Plan:
    """Check the whole pipeline and work out cache keys; raises UserError before anything runs."""
    if policy not in cache.POLICIES:
        raise UserError(f"--cache {policy}: must be one of {', '.join(cache.POLICIES)}")
    build_dir = Path(out_dir) if out_dir else Path("build") / spec.name
    if not str(build_dir).isprintable():    # compilers write source paths into assembler text, line by line
        raise UserError(f"--out {str(build_dir)!r}: a build dir path with a line break or control character "
                        "is not supported")
    _check_build_dir(build_dir, spec)
    seen: list[str] = []
    for i, step in enumerate(spec.pipeline):
        info = registry.pass_info(step.name)
        for req in info.requires:
            if req not in seen:
                later = [j for j, s in enumerate(spec.pipeline) if s.name == req and j > i]
                where = f"it comes later (pipeline[{later[0]}])" if later else "it is not in the pipeline"
                raise spec.error_at(("pipeline", i, step.name), f"needs pass {req!r} earlier, but {where}")
        where = ("pipeline", i, step.name)
        if info.needs_data is True:      # which sections it reads is unsaid: any data: section will do
            if spec.data is None:
                raise spec.error_at(where, "needs text data: add a data: section to the spec")
        else:
            for section in _data_sections(info, step.config):
                if getattr(spec.data, section, None) is None:
                    raise spec.error_at(where, f"needs data.{section} ({DATA_SECTIONS[section]}): "
                                               "add it to the spec's data: section")
        for loc, message in step.config.spec_errors(spec)[:1]:
            raise spec.error_at(where + tuple(loc), message)
        if info.gpu == "required" and not dry_run and not _has_gpu():
            raise spec.error_at(where, "needs a CUDA GPU and none is available (use --dry-run to only check the plan)")
        seen.append(step.name)
    selected = _select_targets(spec, targets)
    if not dry_run:   # the spec checked: the first write (the source's file-hash memo) goes here
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            at = Path(e.filename or build_dir)
            why = f"{at} is a symbolic link to {at.resolve()}, which does not exist" if at.is_symlink() else \
                f"{e.strerror}: {at}"
            raise UserError(f"--out {build_dir}: cannot create it ({why})") from None

    pass_cache = cache.PassCache(build_dir / ".cache" / "passes")
    can_read = cache.reads(policy)
    memo = _memo_file(build_dir, policy)
    write_memo = cache.writes(policy) and not dry_run
    key = cache.chain_key("", "source", source_key(spec.source, memo, write_memo))
    source = PlannedStep("source", key, can_read and pass_cache.has(key))
    steps = []
    for step in spec.pipeline:
        info = registry.pass_info(step.name)
        data = _data_key(spec, _data_sections(info, step.config), memo, write_memo, dry_run)
        key = _step_key(key, spec, info, step.config, data)
        steps.append(PlannedStep(step.name, key, can_read and pass_cache.has(key), info, step.config))
    planned_targets = []
    for name, info, cfg in selected:
        tools = info.toolchain()
        tkey = _target_key(key, name, info.version, cfg.model_dump(mode="json"), tools)
        manifest = cache.read_manifest(build_dir / name)
        hit = (can_read and manifest is not None and manifest.get("cache_key") == tkey
               and manifest.get("files") == file_digests(build_dir / name, memo, write_memo))   # edited: rebuilt
        planned_targets.append(PlannedTarget(name, info, cfg, tkey, hit, tools))
    return Plan(spec, build_dir, policy, source, steps, planned_targets, verify)


BUILD_DIR_MARKS = (".lock", ".cache", "spec.resolved.yaml", "build.log")   # what a build writes first


def _check_build_dir(build_dir: Path, spec: Spec) -> None:
    """A build replaces model/ and its target dirs whole: refuse a dir that is neither empty nor an earlier
    build, and one that holds the spec's own source."""
    out = build_dir.resolve()
    if spec.source.path and not spec.source.path.startswith("pypi:"):
        src = Path(spec.source.path).resolve()
        if src == out or out in src.parents:
            raise UserError(f"--out {build_dir}: holds the spec's source {spec.source.path}; a build would replace "
                            "it (choose another build dir)")
        if src in out.parents:   # its files would be hashed into the source's key, which then never repeats
            raise UserError(f"--out {build_dir}: is inside the spec's source {spec.source.path}; the build's "
                            "outputs would change the source's key on every run (choose a dir outside it)")
    try:
        if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in BUILD_DIR_MARKS):
            raise UserError(f"--out {build_dir}: exists and is not a tscompile build dir (refusing to write into "
                            "it; choose an empty or new dir)")
    except OSError as e:
        raise UserError(f"--out {build_dir}: cannot read ({e.strerror})") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {build_dir}: exists and is not a directory")


def format_plan(plan: Plan) -> str:
    def state(cached: bool) -> str:
        return "cached" if cached else {"off": "run (cache off)", "redo": "run (redo)"}.get(plan.policy, "run")

    lines = [f"plan for {plan.spec.name} -> {plan.build_dir}/ (cache: {plan.policy})",
             f"  source   {describe_source(plan.spec.source)}  [{plan.source.key[:12]}] {state(plan.source.cached)}"]
    for i, s in enumerate(plan.steps):
        needs = ["data"] if s.info.needs_data is True else [f"data.{d}" for d in _data_sections(s.info, s.config)]
        flags = "".join(f", needs {n}" for n in needs) + (f", gpu {s.info.gpu}" if s.info.gpu != "no" else "")
        lines.append(f"  pass {i + 1:<3} {s.label} v{s.info.version}{flags}  [{s.key[:12]}] {state(s.cached)}")
    if not plan.steps:
        lines.append("  (no passes)")
    for t in plan.targets:
        lines.append(f"  target   {t.name} v{t.info.version}  [{t.key[:12]}] {state(t.cached)}")
    if not plan.targets:
        lines.append("  (no targets)")
    goals = {k: v for k, v in plan.spec.verify.goals.model_dump().items() if v not in (None, {})}
    lines.append(f"  verify   {'goals ' + json.dumps(goals) if goals else 'no goals'}" if plan.verify
                 else "  verify   skipped (--no-verify)")
    return "\n".join(lines)


@contextmanager
def _build_lock(build_dir: Path):
    """One build at a time in a build dir: a second one would share the steps' work dirs and replace the same
    outputs under the first (the lock is the kernel's: it goes with the process, however it ends)."""
    import fcntl
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {build_dir}: another tscompile build is writing it; wait for it to finish or "
                            "choose another --out") from None
        yield


@contextmanager
def _build_log(build_dir: Path):
    """Everything logged during the build also goes to build/<name>/build.log (the dir: _build_lock)."""
    handler = logging.FileHandler(build_dir / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


@contextmanager
def _work_dir(plan: Plan, key: str):
    """Scratch for one step: kept under .cache/work/<key>/ across runs when the cache is written, so a
    killed training run resumes; removed once the step's result is stored."""
    if not cache.writes(plan.policy):
        with tempfile.TemporaryDirectory(prefix="tscompile-work-") as d:
            yield Path(d)
        return
    path = plan.build_dir / ".cache" / "work" / key
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _device(info_gpu: str) -> str:
    return "cuda" if info_gpu != "no" and _has_gpu() else "cpu"


class _Build:
    """The state of one run_build: where models come from and what happened."""

    def __init__(self, plan: Plan, bar):
        self.plan = plan
        self.bar = bar          # tqdm over passes, targets and verification
        self.passes = cache.PassCache(plan.build_dir / ".cache" / "passes")
        self.result = BuildResult(plan.build_dir)
        self._source_ir = None

    def done(self, label: str, reused: bool = False) -> None:
        (self.result.reused if reused else self.result.ran).append(label)
        if label != "source":
            self.bar.update(1)

    def context(self, work_dir: Path, device: str) -> Context:
        return Context(spec=self.plan.spec, build_dir=self.plan.build_dir, work_dir=work_dir, device=device,
                       log=log, source_ir=self.source_ir(), seed=self.plan.spec.seed)

    def source_ir(self):
        if self._source_ir is None:
            step = self.plan.source
            if step.cached:
                self._source_ir = self.passes.load(step.key)
                self.done("source", reused=True)
            else:
                log.info("source: loading %s", describe_source(self.plan.spec.source))
                t0 = time.time()
                self._source_ir = load_source(self.plan.spec.source)
                if worth_caching(self.plan.spec.source):
                    self._store(step, self._source_ir)
                self.done("source")
                log.info("source: ready in %.1f s", time.time() - t0)
        return self._source_ir

    def _store(self, step: PlannedStep, ir) -> None:
        if cache.writes(self.plan.policy):
            entry = {"step": step.label, "version": step.info.version if step.info else None,
                     "config": step.config.model_dump(mode="json") if step.config else None}
            self.passes.store(step.key, ir, entry)

    def final_ir(self):
        """Run the passes not cached; the model after the last pass."""
        steps = self.plan.steps
        start = max((i for i, s in enumerate(steps) if s.cached), default=-1)
        for s in steps[:start + 1]:
            self.done(s.label, reused=True)
        ir = self.passes.load(steps[start].key) if start >= 0 else self.source_ir()
        for step in steps[start + 1:]:
            ir = self.run_pass(step, ir)
        return ir

    def run_pass(self, step: PlannedStep, ir):
        from .ir import ModelIR
        log.info("pass %s v%s: running", step.label, step.info.version)
        t0 = time.time()
        with _work_dir(self.plan, step.key) as work:
            out = step.info.run(ir.clone(), step.config, self.context(work, _device(step.info.gpu)))
            if not isinstance(out, ModelIR):
                raise TypeError(f"pass {step.label} returned {type(out).__name__}, not a ModelIR")
            out.meta.setdefault("passes", []).append(
                {"pass": step.label, "version": step.info.version, "config": step.config.model_dump(mode="json")})
            self._store(step, out)
        self.done(step.label)
        log.info("pass %s: done in %.1f s", step.label, time.time() - t0)
        return out

    def model_is_current(self) -> bool:
        """model/ already holds the output of this exact pipeline (its key is recorded beside it)."""
        key_file = self.plan.build_dir / ".model.key"
        return (cache.reads(self.plan.policy) and (self.plan.build_dir / "model" / "config.json").is_file()
                and key_file.is_file() and key_file.read_text() == self.plan.final_key)

    def write_model(self, ir) -> None:
        """build/<name>/model/: hard links to the final cache entry when there is one, else a fresh save."""
        model_dir, key_file = self.plan.build_dir / "model", self.plan.build_dir / ".model.key"
        key = self.plan.final_key
        key_file.unlink(missing_ok=True)     # model/ is about to change: never let the old key vouch for it
        if self.plan.policy != "off" and self.passes.has(key):    # "off" never reads the cache
            with cache.atomic_dir(model_dir) as tmp:
                cache.link_tree(self.passes.path(key), tmp)
                (tmp / cache.ENTRY).unlink(missing_ok=True)
        else:
            ir.save(model_dir)
        cache.write_text_atomic(key_file, key)

    def lower(self, target: PlannedTarget, ir) -> None:
        log.info("target %s v%s: lowering", target.name, target.info.version)
        t0 = time.time()
        with cache.atomic_dir(self.plan.build_dir / target.name) as tmp:
            with _work_dir(self.plan, target.key) as work:
                manifest = target.info.lower(ir, target.config, tmp, self.context(work, _device("optional")))
            if not isinstance(manifest, dict):
                raise TypeError(f"backend {target.name}: lower() returned {type(manifest).__name__}, not a dict")
            tools = target.info.toolchain()   # as lowering left it: it may have fetched a tool, or failed to
            if tools != target.toolchain:
                target.toolchain = tools
                target.key = _target_key(self.plan.final_key, target.name, target.info.version,
                                         target.config.model_dump(mode="json"), tools)
            # "files": sha256 of every file as lowered, so the verifier can tell a tampered artifact
            manifest = {**manifest, "target": target.name, "backend_version": target.info.version,
                        "config": target.config.model_dump(mode="json"), "toolchain": target.toolchain,
                        "model_key": self.plan.final_key, "cache_key": target.key,
                        "files": file_digests(tmp)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        self.done(f"target {target.name}")
        log.info("target %s: done in %.1f s", target.name, time.time() - t0)


    def verify_key(self) -> str:
        """Identifies what a verification checked: the model, the targets, the verify settings, the eval texts
        (as written and their content)."""
        plan, spec = self.plan, self.plan.spec
        evals = spec.data.eval if spec.data else None
        memo = _memo_file(plan.build_dir, plan.policy)
        # a corpus is not built for this (the verifier built it before a key is written; missing now: not current)
        texts = ({p: _text_digest(p, memo, cache.writes(plan.policy), dry_run=True) for p in evals.texts.values()}
                 if evals else None)
        return cache.chain_key(plan.final_key, "verify", [t.key for t in plan.targets],
                               spec.verify.model_dump(mode="json"), evals.model_dump(mode="json") if evals else None,
                               texts)

    def verification_is_current(self) -> bool:
        """verify.json holds a passing verification of exactly these outputs (its key is recorded beside it)."""
        build_dir = self.plan.build_dir
        key_file = build_dir / ".verify.key"
        return (cache.reads(self.plan.policy) and (build_dir / "verify.json").is_file() and key_file.is_file()
                and key_file.read_text() == self.verify_key())

    def verify(self) -> None:
        """Verify unless verify.json already holds a passing verification of exactly these outputs."""
        build_dir = self.plan.build_dir
        report = build_dir / "verify.json"
        if self.verification_is_current():
            self.result.verify = json.loads(report.read_text())
            self.done("verify", reused=True)
            log.info("verify: cached (passed before; %s)", report)
            return
        self.result.verify = verify_dir(build_dir, self.plan.spec, [t.name for t in self.plan.targets])
        # only after it passed (a missed goal is checked again) and judged every target (one that could not run
        # here, e.g. without a GPU, is verified once it can)
        if not skipped_targets(self.result.verify):
            cache.write_text_atomic(build_dir / ".verify.key", self.verify_key())
        self.done("verify")


def forget_verification(build_dir: Path) -> None:
    """Remove verify.json, report.md and its plots (and the key vouching for them): they describe earlier
    outputs."""
    for name in (".verify.key", "verify.json", "report.md"):
        (build_dir / name).unlink(missing_ok=True)
    plots = build_dir / "plots"
    if plots.is_dir() and not plots.is_symlink():
        shutil.rmtree(plots)
    else:   # a file or a link where the report's plots go
        plots.unlink(missing_ok=True)


def verify_dir(build_dir: Path, spec: Spec, targets: list[str], not_verified: dict[str, str] | None = None) -> dict:
    """Run the verifier on a build dir, first forgetting any earlier verification (a verifier that fails
    half-way leaves no report of other outputs). not_verified: targets reported as skipped, with the reason."""
    forget_verification(build_dir)
    from .verify import verify_build  # a missing verifier fails the build: never skip silently
    return verify_build(build_dir, spec, targets, not_verified)


def why_not_current(build_dir: Path, target: str) -> str | None:
    """None when build_dir/target was lowered from the model now in model/ by these tools (its manifest's cache
    key chains from .model.key); else why not, for a message."""
    key_file = build_dir / ".model.key"
    if not key_file.is_file():
        return f"{build_dir}: no model/ of a finished build"
    model_key = key_file.read_text()
    manifest = cache.load_manifest(build_dir / target)   # a damaged one is an error, not "built earlier"
    if manifest.get("cache_key") == _target_key(model_key, target, manifest.get("backend_version"),
                                                manifest.get("config"), manifest.get("toolchain", "")):
        return None
    if manifest.get("model_key") == model_key:   # the same model: what differs is in every key (cache.tool_versions)
        return (f"{build_dir / target} was built by other versions of tscompile, torch, onnx or onnxruntime "
                f"than these")
    return f"{build_dir / target} was built from an earlier model than model/"


def run_build(plan: Plan) -> BuildResult:
    """Execute a checked plan. GoalMissed (from verification) and UserError propagate."""
    t0 = time.time()
    build_dir = plan.build_dir
    from tqdm import tqdm
    total = len(plan.steps) + len(plan.targets) + plan.verify
    with _build_lock(build_dir), _build_log(build_dir), \
            tqdm(total=total, desc=f"build {plan.spec.name}", unit="step", disable=None, leave=False) as bar:
        cache.sweep_stale(build_dir)
        log.debug("plan:\n%s", format_plan(plan))
        b = _Build(plan, bar)
        ir, model_current = None, b.model_is_current()
        if model_current and all(t.cached for t in plan.targets):
            for s in plan.steps:                                  # nothing needs the model in memory
                b.done(s.label, reused=True)
            log.info("model: cached")
        else:
            forget_verification(build_dir)   # outputs are about to change: a failed or killed build keeps no old report
            ir = b.final_ir()
            if not model_current:
                b.write_model(ir)
        cache.write_text_atomic(build_dir / "spec.resolved.yaml", plan.spec.to_yaml())
        for target in plan.targets:
            if target.cached:
                b.done(f"target {target.name}", reused=True)
                log.info("target %s: cached", target.name)
            else:
                b.lower(target, ir)
        if plan.verify:
            b.verify()
        elif not b.verification_is_current():
            forget_verification(build_dir)     # never leave a report of other outputs looking current
        b.result.seconds = time.time() - t0
        n_ran = len(b.result.ran)
        log.info("build %s: %s in %.1f s -> %s/", plan.spec.name,
                 "everything cached, nothing to rebuild" if n_ran == 0 else
                 f"ran {', '.join(b.result.ran)}; reused {len(b.result.reused)} cached", b.result.seconds, build_dir)
    return b.result


def build(spec: Spec, **kw: Any) -> BuildResult:
    """plan_build + run_build (the programmatic equivalent of `tscompile build`)."""
    return run_build(plan_build(spec, **kw))
