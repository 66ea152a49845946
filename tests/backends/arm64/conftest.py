"""Session fixture: the tiny test models lowered once (cross, host and ASan+UBSan host binaries)."""
from __future__ import annotations

import pytest
from arm64_cases import FORCED, PROMPT, Built, make_variant, stepwise_reference


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> Built, lowered on first use (cross + host + ASan host binaries)."""
    from tscompile.backends.arm64 import BACKEND
    from tscompile.backends.arm64.build import build_binaries
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            ir, dtype = make_variant(name)
            out = tmp_path_factory.mktemp(name) / "arm64"
            manifest = BACKEND.lower(ir, BACKEND.config(dtype=dtype), out, None)
            build_binaries(out, aarch64=False, host=False, sanitizers=("asan",))
            cache[name] = Built(name, ir, dtype, out, manifest, stepwise_reference(ir, PROMPT, FORCED),
                                stepwise_reference(ir, PROMPT, FORCED, gated=False))
        return cache[name]
    return get
