"""The native ONNX Runtime kernel library (backends/onnx, libtscompile_ort.so) built with ASan+UBSan runs the
golden cases that reach it (exact and predictor SparseFFN) clean inside the real ONNX Runtime, with the
reference's logits. A copy with one injected heap overflow proves the sanitizer and the kernel really run.

The generated ARM64 C runtime's ASan+UBSan build runs the tiny models and 80+ hostile weight blobs in
tests/backends/arm64/test_runtime.py (where "host-asan") and test_blob.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from golden_cases import CASES, PROMPT, STEPS, case_ir

SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SPARSE_CASES = [c for c, kw in CASES.items() if "predictor" in c or kw.get("mode") == "exact"]
INJECTED = ("std::vector<uint8_t> fire(I);", "std::vector<uint8_t> fire(I - 1);")   # fire[I - 1] overflows


def compile_library(source: str, out: Path, include: Path) -> subprocess.Popen:
    from tscompile.backends.onnx.native import CXXFLAGS
    out.with_suffix(".cpp").write_text(source)
    flags = [f for f in CXXFLAGS if not f.startswith("-O")] + SANITIZE
    return subprocess.Popen(["g++", *flags, f"-I{include}", str(out.with_suffix(".cpp")), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """(good library, library with the injected overflow, {case: model.onnx},
    {case: (forced ids, reference logits)})."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    from tscompile.backends.onnx.native import ort_include_dir, render_source

    from tscompile import registry
    from tscompile.verify import ReferenceRunner
    include, why = ort_include_dir()
    if include is None:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("ort asan")
    source = render_source()
    assert INJECTED[0] in source
    jobs = [compile_library(source, d / "good.so", include),
            compile_library(source.replace(*INJECTED), d / "overflow.so", include)]
    onnx = registry.backend("onnx")
    models, refs = {}, {}
    for case in SPARSE_CASES:            # lowered and referenced while g++ runs
        onnx.lower(case_ir(case), onnx.config(native=False), d / case, None)
        models[case] = d / case / "model.onnx"
        ref = ReferenceRunner(case_ir(case), onnx.load(d / case, native=False).prefill)
        tokens = ref.generate(PROMPT, STEPS)
        refs[case] = (tokens[:-1], ref.logits(PROMPT, tokens[:-1]))
    for job in jobs:
        assert job.wait() == 0, job.stderr.read()[-3000:]
    return d / "good.so", d / "overflow.so", models, refs


def run_under_asan(library: Path, models: list[Path], forced: list[int], out: Path) -> subprocess.CompletedProcess:
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=False).stdout.strip()
    env = {**os.environ, "LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1", "OMP_WAIT_POLICY": "PASSIVE"}
    out.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(Path(__file__).with_name("ort_asan_worker.py")), str(library),
                           str(out), ",".join(map(str, PROMPT)), ",".join(map(str, forced)), *map(str, models)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_sanitized_native_kernels_match_the_reference(sanitized, tmp_path):
    good, _, models, refs = sanitized
    for case in SPARSE_CASES:      # one interpreter per case: the forced tokens differ
        forced, want = refs[case]
        res = run_under_asan(good, [models[case]], forced, tmp_path / case)
        assert res.returncode == 0 and "Sanitizer" not in res.stderr and "runtime error" not in res.stderr, \
            (case, res.stderr[-3000:])
        got = np.load(tmp_path / case / "0.npy")
        assert got.shape == want.shape, case
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4, case
        assert (got.argmax(-1) == want.argmax(-1)).all(), case


def test_an_injected_overflow_is_caught(sanitized, tmp_path):
    """The same source with `fire` one element short: ASan stops the run (the kernel ran, the sanitizer is live)."""
    _, overflow, models, refs = sanitized
    case = SPARSE_CASES[0]
    res = run_under_asan(overflow, [models[case]], refs[case][0], tmp_path)
    assert res.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-3000:]
