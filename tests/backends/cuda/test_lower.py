"""The cuda target on a machine without a GPU: lowering, nvcc compilation (sm_90 and sm_80), the generated-source
golden, and the PyTorch half of the runtime (dense decoder vs the reference on the CPU)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch
from cpu_decoder import decode_on_cpu
from golden_cases import CASES, case_ir
from tscompile.backends.cuda import BACKEND, CudaConfig
from tscompile.backends.cuda.kernels import (LIBRARY, KernelShape, check_shape, compile_library, nvcc_path,
                                             render_source)
from tscompile.backends.cuda.lower import ffn_specs, gpu_weights, lower_cuda
from tscompile.errors import UserError
from tscompile.tiny import make_tiny_ir

GOLDEN = Path(__file__).parents[2] / "golden" / "cuda" / "tiny-drelu-predictor.cu"
UPDATE = os.environ.get("TSCOMPILE_UPDATE_GOLDENS") == "1"
needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda")
    return out, lower_cuda(case_ir("mistral-drelu-predictor"), CudaConfig(), out)


def test_generated_source_matches_golden(lowered):
    out, _ = lowered
    src = (out / "ffn.cu").read_text()
    if UPDATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(src)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: create it with TSCOMPILE_UPDATE_GOLDENS=1"
    assert src == GOLDEN.read_text(), "generated CUDA changed: review, then TSCOMPILE_UPDATE_GOLDENS=1"
    assert "#define HIDDEN 64" in src and "#define INTER 192" in src
    assert "ACT_DRELU" in src and "sparse_ffn<1, 1, 32," in src   # only the activation the model uses


def test_lowering_writes_weights_and_manifest(lowered):
    from safetensors import safe_open
    out, manifest = lowered
    ir = case_ir("mistral-drelu-predictor")
    assert set(manifest["files"]) >= {"ffn.cu", "weights.safetensors"}
    assert manifest["ffns"][0] == {"activation": "drelu", "threshold": 0.0, "mode": "predictor",
                                   "predictor_threshold": 0.0, "predictor_relu": True}
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        down_t = f.get_tensor("layers.1.down_t")
        assert down_t.dtype == torch.bfloat16 and tuple(down_t.shape) == (192, 64)
        want = ir.weights["model.layers.1.mlp.down_proj.weight"].T.to(torch.bfloat16)
        assert torch.equal(down_t, want)
        assert tuple(f.get_tensor("layers.0.fc1").shape) == (8, 64)
        assert tuple(f.get_tensor("layers.0.qkv").shape) == (64 + 2 * 32, 64)


@needs_nvcc
def test_library_is_built_and_loads_without_a_gpu(lowered):
    out, manifest = lowered
    assert manifest["compiled"] and (out / LIBRARY).exists()
    lib = ctypes.CDLL(str(out / LIBRARY))   # static cudart: loading needs no driver
    assert (lib.tsc_hidden_size(), lib.tsc_intermediate_size(), lib.tsc_max_batch()) == (64, 192, 8)


@needs_nvcc
def test_compiles_for_sm80_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path))
    shape = KernelShape("tiny-sm80", 64, 192, "float16", ("swiglu",), 16)
    lib = compile_library(render_source(shape), "sm_80")   # no dest: the cached library itself
    assert lib.is_relative_to(tmp_path / "cuda") and ctypes.CDLL(str(lib)).tsc_hidden_size() == 64


@needs_nvcc
def test_timeline_hooks_still_apply(tmp_path, monkeypatch):
    """benchmarks/cuda_timeline.py hooks the generated decode source at anchors that must each occur once: they
    are all still there, and the hooked source compiles."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[3] / "benchmarks"))
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path))
    from cuda_timeline import KERNELS, MARKS, with_hooks
    shape = KernelShape("timeline", 64, 192, "bfloat16", ("swiglu",), 16, batches=(1,), heads=4, kv_heads=2,
                        head_dim=16)
    src = with_hooks(render_source(shape))
    assert src.count("TraceBlock trace_block(") == len(KERNELS)
    assert src.count("    TRACE_MARK(") == sum(len(m) for m in MARKS.values())
    assert ctypes.CDLL(str(compile_library(src, "sm_90"))).tsc_trace_read


def test_mode_dense_is_in_the_ffn_specs():
    """An FFN the predictors pass left in mode dense (no sparsity worth skipping) is marked so for the runtime,
    which runs it on the dense kernels (test_runtime_gpu.py)."""
    from tscompile.backends.cuda.model import FFNSpec
    ir = case_ir("mistral-drelu-predictor").clone()   # case_ir's models are shared by every test
    ir.layers[1].mode = "dense"
    specs = [FFNSpec(**f) for f in ffn_specs(ir)]
    assert [(s.gated, s.dense) for s in specs] == [(True, False), (False, True)]
    with pytest.raises(ValueError, match="FFNSpec.mode True"):      # the old positional `gated`
        FFNSpec("swiglu", 0.0, True)


def test_bad_models_are_refused(tmp_path):
    with pytest.raises(UserError, match="hidden_size 60 is not a multiple of 8"):
        lower_cuda(make_tiny_ir("llama", hidden=60, heads=4, kv_heads=2), CudaConfig(), tmp_path / "h60")
    # nvcc had failed on these (static shared memory of the attention kernel; the ring past what a block may ask)
    with pytest.raises(UserError, match="^.*: 16 query heads per KV head, the attention kernel takes at most 8$"):
        lower_cuda(make_tiny_ir("llama", hidden=256, heads=16, kv_heads=1), CudaConfig(), tmp_path / "g16")
    with pytest.raises(UserError, match="hidden_size 16392 is larger than the kernels support"):
        check_shape(KernelShape("m", 16392, 64, "bfloat16", ("swiglu",)), "m")
    check_shape(KernelShape("m", 16384, 64, "bfloat16", ("swiglu",), heads=128, kv_heads=16, head_dim=128), "m")


def test_available_says_why_not_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no CUDA GPU" in BACKEND.available()


@pytest.mark.parametrize("name", CASES)
def test_decoder_matches_reference_on_cpu(name):
    """The runtime's attention/norm/rope/FFN code (dense path, float32, CPU) against the reference."""
    got, want = decode_on_cpu(case_ir(name), (5, 77), gating="exact")   # prompt, then two decode steps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_a_weight_beyond_float16_is_refused_naming_it():
    """In float16 weights it became inf, and the outputs NaN; bfloat16 has the range."""
    ir = make_tiny_ir("llama", "drelu", seed=1)
    ir.weights["model.layers.1.mlp.down_proj.weight"][3, 5] = -7e4
    with pytest.raises(UserError, match=r"^cuda: tensor model\.layers\.1\.mlp\.down_proj\.weight holds 70000, "
                                        r"beyond float16's range "
                                        r"\(65504\); use dtype bfloat16 for this target$"):
        gpu_weights(ir, torch.float16)
    assert torch.isfinite(gpu_weights(ir, torch.bfloat16)["layers.1.down_t"].float()).all()
