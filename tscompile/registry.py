"""Where passes and backends come from: entry points, plug-in modules, explicit registration.

Discovery is lazy: listing names reads only package metadata; a pass or backend module is imported the first
time it is looked up. Sources, in order of precedence:

  1. `register_pass(PassInfo)` / `register_backend(BackendInfo)` calls (a plug-in module may make them);
  2. plug-in modules named by `-p MODULE` or the spec's `plugins:` list (`load_plugin`): a module that exposes
     `PASS`, `PASSES`, `BACKEND` or `BACKENDS` has those registered when it is imported;
  3. entry points in the groups `tscompile.passes` and `tscompile.backends` (built-ins use these too).

`TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD=1` ignores third-party entry points (those whose module does not start
with `tscompile.`); built-ins and explicitly named plug-ins still load.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from importlib.metadata import EntryPoint, entry_points

from .api import BackendInfo, PassConfig, PassInfo
from .errors import UserError

PASS_GROUP = "tscompile.passes"
BACKEND_GROUP = "tscompile.backends"
_KINDS = {PASS_GROUP: ("pass", PassInfo), BACKEND_GROUP: ("backend", BackendInfo)}

_registered: dict[str, dict[str, PassInfo | BackendInfo]] = {PASS_GROUP: {}, BACKEND_GROUP: {}}
_from_entry_points: dict[tuple[str, str], PassInfo | BackendInfo] = {}   # (group, ep.value) -> loaded object
_loaded_plugins: set[str] = set()


def autoload_enabled() -> bool:
    return os.environ.get("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")


def _entry_points(group: str) -> dict[str, EntryPoint]:
    out: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if not autoload_enabled() and not ep.value.startswith("tscompile."):
            continue
        # The same name twice (e.g. an old and a new editable install) keeps the first, like pip's path order.
        out.setdefault(ep.name, ep)
    return out


def _names(group: str) -> list[str]:
    return sorted(set(_registered[group]) | set(_entry_points(group)))


def pass_names() -> list[str]:
    """Every known pass name, without importing any pass module."""
    return _names(PASS_GROUP)


def backend_names() -> list[str]:
    return _names(BACKEND_GROUP)


def _lookup(group: str, name: str):
    kind, cls = _KINDS[group]
    if name in _registered[group]:
        return _registered[group][name]
    ep = _entry_points(group).get(name)
    if ep is None:
        raise UserError(f"unknown {kind} {name!r}{suggest(name, _names(group))}")
    if (group, ep.value) in _from_entry_points:
        return _from_entry_points[group, ep.value]
    try:
        info = ep.load()
    except Exception as e:  # any failure inside a plug-in is the plug-in's, reported in one line
        raise UserError(f"{kind} plug-in {name!r} ({ep.value}) failed to load: {type(e).__name__}: "
                        f"{_one_line(e)}") from e
    if not isinstance(info, cls):
        raise UserError(f"{kind} plug-in {name!r} ({ep.value}) is a {type(info).__name__}, not a {cls.__name__}")
    if info.name != name:
        raise UserError(f"{kind} plug-in {name!r} ({ep.value}) calls itself {info.name!r}")
    _from_entry_points[group, ep.value] = info
    return info


def pass_info(name: str) -> PassInfo:
    return _lookup(PASS_GROUP, name)


def backend(name: str) -> BackendInfo:
    return _lookup(BACKEND_GROUP, name)


def _all(group: str) -> tuple[dict, list[str]]:
    """(name -> info for everything that loads, one-line errors for what does not)."""
    ok, errors = {}, []
    for name in _names(group):
        try:
            ok[name] = _lookup(group, name)
        except UserError as e:
            errors.append(str(e))
    return ok, errors


def all_passes() -> tuple[dict[str, PassInfo], list[str]]:
    return _all(PASS_GROUP)


def all_backends() -> tuple[dict[str, BackendInfo], list[str]]:
    return _all(BACKEND_GROUP)


def _register(group: str, info) -> None:
    kind, cls = _KINDS[group]
    if not isinstance(info, cls):
        raise UserError(f"register_{kind}: expected a {cls.__name__}, got {type(info).__name__}")
    if not (isinstance(info.config, type) and issubclass(info.config, PassConfig)):   # unknown keys would be dropped
        raise UserError(f"{kind} {info.name!r}: config must be a PassConfig subclass, got {info.config!r}")
    old = _registered[group].get(info.name)
    if old is not None and old is not info:
        raise UserError(f"{kind} {info.name!r} is registered twice (versions {old.version} and {info.version})")
    _registered[group][info.name] = info


def register_pass(info: PassInfo) -> None:
    """Make a pass available by name (overrides an entry point of the same name)."""
    _register(PASS_GROUP, info)


def register_backend(info: BackendInfo) -> None:
    _register(BACKEND_GROUP, info)


def unregister(name: str) -> None:
    """Forget an explicitly registered pass or backend (tests register throwaway ones)."""
    for group in _registered.values():
        group.pop(name, None)


def load_plugin(module: str) -> None:
    """Import a plug-in module (from sys.path or the current directory); register the
    PASS/PASSES/BACKEND/BACKENDS it exposes."""
    if module in _loaded_plugins:
        return
    if "/" in module or module.endswith(".py"):
        name = os.path.basename(module).removesuffix(".py")
        raise UserError(f"plug-in {module!r}: give a module name, not a file path (e.g. -p {name}, run from the "
                        "directory that holds it, or with it on PYTHONPATH)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())      # like `python -m`: a plug-in module in the current directory is found
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise UserError(f"plug-in {module!r} failed to import: {type(e).__name__}: {_one_line(e)}") from e
    for one, many, group in (("PASS", "PASSES", PASS_GROUP), ("BACKEND", "BACKENDS", BACKEND_GROUP)):
        items = getattr(mod, many, ())
        if not isinstance(items, (list, tuple)):
            raise UserError(f"plug-in {module!r}: {many} must be a list, got {type(items).__name__}")
        items = list(items)
        if getattr(mod, one, None) is not None:
            items.append(getattr(mod, one))
        for info in items:
            try:
                _register(group, info)
            except UserError as e:
                raise UserError(f"plug-in {module!r}: {e}") from None
    _loaded_plugins.add(module)


def suggest(name: str, choices: list[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or the list of choices when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (known: {', '.join(choices)})" if choices else " (none are registered)"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or "(no message)"
