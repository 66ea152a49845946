"""The session's lowered tiny models (built on first use, shared by every test of this folder)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def lowered(tmp_path_factory):
    """(activation, mode) -> Lowered, built on first use."""
    done: dict = {}

    def get(activation: str, mode: str, dtype: str = "float32"):
        key = (activation, mode, dtype)
        if key not in done:
            from onnx_tiny import lower_tiny

            done[key] = lower_tiny(
                activation, mode, tmp_path_factory.mktemp(f"onnx-{activation}-{mode}-{dtype}"), dtype
            )
        return done[key]

    return get
