"""The session's lowered tiny models (built on first use, shared by every test of this folder)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def lowered(tmp_path_factory):
    """(activation, mode, dtype, family) -> Lowered, built on first use."""
    done: dict = {}

    def get(activation: str, mode: str, dtype: str = "float32", family: str = ""):
        key = (activation, mode, dtype, family)
        if key not in done:
            from onnx_tiny import lower_tiny

            done[key] = lower_tiny(
                activation, mode, tmp_path_factory.mktemp(f"onnx-{activation}-{mode}-{dtype}"), dtype, family
            )
        return done[key]

    return get
