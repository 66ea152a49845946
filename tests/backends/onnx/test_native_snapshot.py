"""The generated native SparseFFN C++ is diffed against a golden, so template changes show up as diffs.

TSCOMPILE_UPDATE_GOLDENS=1 rewrites the golden after a reviewed template change.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from tscompile.backends.onnx.native import render_source

GOLDEN = Path(__file__).parents[2] / "golden" / "onnx" / "sparse_ffn_x86_64.cpp"
UPDATE = os.environ.get("TSCOMPILE_UPDATE_GOLDENS") == "1"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the golden is the x86_64 rendering")
def test_generated_kernel_source_matches_golden():
    src = render_source()
    if UPDATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(src)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: write it with TSCOMPILE_UPDATE_GOLDENS=1 and review it"
    assert src == GOLDEN.read_text(), "generated C++ changed: review the diff, then TSCOMPILE_UPDATE_GOLDENS=1"
    assert "RegisterCustomOps" in src and "ai.tscompile" in src


@pytest.mark.parametrize("cxx, want", [("/nonexistent/g++", "CXX=/nonexistent/g++: no such compiler (unset CXX to use "
                                                           "g++)"),
                                       ("false", "false failed to build the SparseFFN kernel library (CXX, "
                                                 "ORT_INCLUDE_DIR): exit status 1")])
def test_a_compiler_that_fails_is_a_one_line_user_error(cxx, want, tmp_path, monkeypatch):
    from tscompile.backends.onnx.native import build_library, ort_include_dir

    from tscompile.errors import UserError
    if ort_include_dir()[0] is None:
        pytest.skip("no ONNX Runtime headers")
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(UserError) as e:
        build_library(tmp_path)
    assert str(e.value) == want
