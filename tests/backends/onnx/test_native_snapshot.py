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
