"""Registry: entry points (built-in, the installed example plug-in, a broken third party), plug-in modules,
the autoload switch, suggestions."""
from __future__ import annotations

import pytest
from tsc_test_plugin import fake_distribution

from tscompile import registry
from tscompile.api import PassConfig, PassInfo
from tscompile.errors import UserError

BUILTIN_PASSES = {"drelu", "relufy", "threshold", "magnitude", "profile", "predictors", "reorder"}


@pytest.fixture
def broken_dist(tmp_path, monkeypatch):
    """A third-party distribution on sys.path whose pass module raises at import."""
    fake_distribution(tmp_path, "tscompile.passes", "broken = tsc_broken_mod:PASS", "tsc_broken_mod",
                      "raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_example_plugin_found_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert "prune_neurons" in registry.pass_names()
    info = registry.pass_info("prune_neurons")
    assert info.name == "prune_neurons" and info.version == "1"
    assert info.config().fraction == 0.1 and info.run.__module__ == "example_prune"
    assert "prune_neurons" in registry.all_passes()[0]


def test_builtins_are_listed_without_importing_them(monkeypatch):
    monkeypatch.delenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert BUILTIN_PASSES <= set(registry.pass_names())
    assert {"onnx", "arm64", "cuda"} <= set(registry.backend_names())


def test_autoload_switch_hides_third_party_entry_points_only(monkeypatch, broken_dist):
    monkeypatch.setenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = set(registry.pass_names())
    assert BUILTIN_PASSES <= names
    assert "prune_neurons" not in names and "broken" not in names
    with pytest.raises(UserError, match="^unknown pass 'prune_neurons'"):
        registry.pass_info("prune_neurons")
    assert not any("broken" in e for e in registry.all_passes()[1])
    monkeypatch.setenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert {"prune_neurons", "broken"} <= set(registry.pass_names())


def test_broken_plugin_is_one_line_naming_it(monkeypatch, broken_dist):
    monkeypatch.delenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    want = "pass plug-in 'broken' (tsc_broken_mod:PASS) failed to load: RuntimeError: boom at import"
    with pytest.raises(UserError) as e:
        registry.pass_info("broken")
    assert str(e.value) == want
    ok, errors = registry.all_passes()
    assert want in errors and "broken" not in ok and "prune_neurons" in ok


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UserError, match=r"^unknown pass 'drelo'; did you mean 'drelu'\?$"):
        registry.pass_info("drelo")
    with pytest.raises(UserError, match=r"^unknown backend 'arm46'; did you mean 'arm64'\?$"):
        registry.backend("arm46")
    with pytest.raises(UserError, match=r"^unknown backend 'zzzz' \(known: .*onnx"):
        registry.backend("zzzz")


def test_plugin_module_exposing_passes(tmp_path, monkeypatch):
    (tmp_path / "tsc_plug_a.py").write_text(
        "from tscompile.api import PassConfig, PassInfo\n"
        "PASS = PassInfo('plug_a', '3', 'a', PassConfig, lambda ir, cfg, ctx: ir)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load_plugin("tsc_plug_a")
    try:
        assert registry.pass_info("plug_a").version == "3"
        registry.load_plugin("tsc_plug_a")                 # loading twice is harmless
    finally:
        registry.unregister("plug_a")


def test_plugin_module_calling_register_pass(tmp_path, monkeypatch):
    (tmp_path / "tsc_plug_b.py").write_text(
        "from tscompile import registry\nfrom tscompile.api import PassConfig, PassInfo\n"
        "registry.register_pass(PassInfo('plug_b', '1', 'b', PassConfig, lambda ir, cfg, ctx: ir))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load_plugin("tsc_plug_b")
    try:
        assert "plug_b" in registry.pass_names()
        other = PassInfo("plug_b", "2", "b2", PassConfig, lambda ir, cfg, ctx: ir)
        with pytest.raises(UserError, match=r"^pass 'plug_b' is registered twice \(versions 1 and 2\)$"):
            registry.register_pass(other)
    finally:
        registry.unregister("plug_b")
    assert "plug_b" not in registry.pass_names()


def test_what_a_plugin_module_exposes_wrongly_names_the_module(tmp_path, monkeypatch):
    (tmp_path / "tsc_plug_c.py").write_text("PASSES = [{'name': 'c'}]\n")
    for module, version in (("tsc_plug_e1", 3), ("tsc_plug_e2", 1)):
        (tmp_path / f"{module}.py").write_text(
            "from tscompile.api import PassConfig, PassInfo\n"
            f"PASS = PassInfo('plug_e', '{version}', 'e', PassConfig, lambda ir, cfg, ctx: ir)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"^plug-in 'tsc_plug_c': register_pass: expected a PassInfo, got dict$"):
        registry.load_plugin("tsc_plug_c")
    (tmp_path / "tsc_plug_f.py").write_text("PASSES = 5\n")
    (tmp_path / "tsc_plug_g.py").write_text(
        "from pydantic import BaseModel\nfrom tscompile.api import PassInfo\n"
        "PASS = PassInfo('plug_g', '1', 'g', BaseModel, lambda ir, cfg, ctx: ir)\n")
    with pytest.raises(UserError, match=r"^plug-in 'tsc_plug_f': PASSES must be a list, got int$"):
        registry.load_plugin("tsc_plug_f")
    with pytest.raises(UserError, match=r"^plug-in 'tsc_plug_g': pass 'plug_g': config must be a PassConfig "
                                        r"subclass, got <class 'pydantic.main.BaseModel'>$"):
        registry.load_plugin("tsc_plug_g")   # a plain model would drop unknown keys without a word
    registry.load_plugin("tsc_plug_e1")
    try:
        with pytest.raises(UserError, match=r"^plug-in 'tsc_plug_e2': pass 'plug_e' is registered twice "
                                            r"\(versions 3 and 1\)$"):
            registry.load_plugin("tsc_plug_e2")
    finally:
        registry.unregister("plug_e")


def test_plugin_import_failure_is_one_line():
    with pytest.raises(UserError) as e:
        registry.load_plugin("tsc_no_such_module_xyz")
    assert str(e.value) == ("plug-in 'tsc_no_such_module_xyz' failed to import: ModuleNotFoundError: "
                            "No module named 'tsc_no_such_module_xyz'")


def test_entry_point_of_the_wrong_kind(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "tscompile.backends", "odd = tsc_odd_mod:BACKEND", "tsc_odd_mod",
                      "BACKEND = 'not a BackendInfo'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TSCOMPILE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    with pytest.raises(UserError, match=r"^backend plug-in 'odd' \(tsc_odd_mod:BACKEND\) is a str, not a BackendInfo$"):
        registry.backend("odd")
