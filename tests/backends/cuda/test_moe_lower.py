"""Mixtral on the cuda target without a GPU: lowering (stacked expert weights, padded predictors, manifest), the
generated MoE source golden, nvcc compilation for sm_90 and sm_80, the refusals, and the PyTorch half of the MoE
runtime (dense path, per-expert thresholds) against the reference on the CPU."""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
import torch
from cpu_decoder import decode_on_cpu
from tscompile.backends.cuda import CudaConfig
from tscompile.backends.cuda.kernels import (LIBRARY, KernelShape, compile_library, nvcc_command, nvcc_path,
                                             render_source)
from tscompile.backends.cuda.lower import lower_cuda
from tscompile.backends.cuda.moe import MoEShape, render_moe_source

from tscompile.errors import UserError
from tscompile.ir import Predictor, ffn_names, predictor_names
from tscompile.tiny import add_random_predictors, make_tiny_ir

GOLDEN = Path(__file__).parents[2] / "golden" / "cuda" / "tiny-mixtral-drelu-predictor.moe.cu"
UPDATE = os.environ.get("TSCOMPILE_UPDATE_GOLDENS") == "1"
MOE_PART = "// ---- mixture of experts"
needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def tiny_mixtral():
    """4 experts, top-2, dReLU, rank-8 predictors on experts 0-2 with ranks 8, 8, 5 (padded to 8), none on 3."""
    ir = add_random_predictors(make_tiny_ir("mixtral", "drelu", seed=7, experts=4, top_k=2), rank=8, seed=3)
    for layer in range(ir.config.num_layers):
        fc1, fc2 = predictor_names(layer, 2)
        ir.weights[fc1], ir.weights[fc2] = ir.weights[fc1][:5], ir.weights[fc2][:, :5]
        ir.layers[layer].experts[2].predictor = Predictor(rank=5, threshold=0.1, relu=False)
        ir.layers[layer].experts[3].mode, ir.layers[layer].experts[3].predictor = "exact", None
        ir.layers[layer].experts[3].threshold = 0.02
    return ir


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-moe")
    return out, lower_cuda(tiny_mixtral(), CudaConfig(), out)


def test_generated_moe_source_matches_golden(lowered):
    """The MoE part of the source (what follows the FFN helpers of ffn.cu.j2, which test_lower.py covers)."""
    out, _ = lowered
    src = (out / "ffn.cu").read_text()
    moe = src[src.index(MOE_PART):]
    if UPDATE or not GOLDEN.exists():
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(moe)
    assert moe == GOLDEN.read_text(), "generated MoE CUDA changed: review, then TSCOMPILE_UPDATE_GOLDENS=1"
    assert "#define NUM_EXPERTS 4" in moe and "#define TOP_K 2" in moe and "#define HIDDEN 64" in src
    assert "moe_experts<1, 32, 32, 16, 3>" in moe          # only the activation the model uses (drelu = 3)
    assert "sparse_ffn<1," not in src and "tsc_sparse_ffn" not in src   # no dense FFN kernel, no empty entry point


def test_lowering_stacks_experts_and_pads_predictors(lowered):
    from safetensors import safe_open
    out, manifest = lowered
    ir = tiny_mixtral()
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    layer = manifest["ffns"][1]
    assert [e["mode"] for e in layer["experts"]] == ["predictor", "predictor", "predictor", "exact"]
    assert layer["experts"][2] == {"activation": "drelu", "threshold": 0.0, "mode": "predictor",
                                   "predictor_threshold": 0.1, "predictor_relu": False}
    assert layer["experts"][3]["threshold"] == 0.02
    assert manifest["kernel_shape"]["experts"] == 4 and manifest["kernel_shape"]["max_rank"] == 8
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("layers.1.router").shape) == (4, H)
        gate, down_t = f.get_tensor("layers.1.gate"), f.get_tensor("layers.1.down_t")
        assert gate.dtype == torch.bfloat16 and tuple(gate.shape) == (4 * I, H)
        for e in range(4):   # neuron j of expert e is row e * I + j
            g, _, d = ffn_names(1, e)
            assert torch.equal(gate[e * I:(e + 1) * I], ir.weights[g].to(torch.bfloat16))
            assert torch.equal(down_t[e * I:(e + 1) * I], ir.weights[d].T.to(torch.bfloat16))
        fc1, fc2 = f.get_tensor("layers.1.fc1"), f.get_tensor("layers.1.fc2")
        assert tuple(fc1.shape) == (4 * 8, H) and tuple(fc2.shape) == (4 * I, 8)
        a, b = (ir.weights[n].to(torch.bfloat16) for n in predictor_names(1, 2))
        assert torch.equal(fc1[16:21], a) and not fc1[21:24].any()          # rank 5 padded with zero rows
        assert torch.equal(fc2[2 * I:3 * I, :5], b) and not fc2[2 * I:3 * I, 5:].any()
        assert not fc1[24:].any() and not fc2[3 * I:].any()                 # expert 3 has no predictor


@needs_nvcc
def test_moe_library_is_built_and_loads_without_a_gpu(lowered, tmp_path, monkeypatch):
    out, manifest = lowered
    assert manifest["compiled"]
    lib = ctypes.CDLL(str(out / LIBRARY))
    assert (lib.tsc_num_experts(), lib.tsc_top_k(), lib.tsc_hidden_size(), lib.tsc_intermediate_size()) == (4, 2, 64,
                                                                                                             192)
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path))
    shape = MoEShape("odd-sm80", 200, 999, 5, 3, "float16", ("swiglu", "geglu"), 24)   # 5 experts, top-3, fp16
    lib80 = ctypes.CDLL(str(compile_library(render_moe_source(shape), "sm_80")))
    assert (lib80.tsc_num_experts(), lib80.tsc_top_k()) == (5, 3)


@needs_nvcc
def test_generated_sources_compile_without_warnings(lowered, tmp_path):
    """The dense model's source and the MoE model's (FFN helpers and decode kernels, no dense FFN kernel) under
    -Werror for sm_90 and sm_80: no unused variables, no empty entry points."""
    out, _ = lowered
    dense = render_source(KernelShape("tiny", 64, 192, "bfloat16", ("drelu", "swiglu"), 8, heads=4, kv_heads=2,
                                      head_dim=16))
    for name, src in {"dense.cu": dense, "moe.cu": (out / "ffn.cu").read_text()}.items():
        (tmp_path / name).write_text(src)
        cmd = nvcc_command(nvcc_path(), "sm_90", tmp_path / name, tmp_path / f"{name}.so")
        proc = subprocess.run(cmd + ["-gencode=arch=compute_80,code=sm_80", "-Werror", "all-warnings"],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{name}: {proc.stderr[-2000:]}"


def test_moe_models_the_kernels_cannot_run_are_refused(tmp_path):
    ir = make_tiny_ir("mixtral", "swiglu", experts=4, top_k=2)
    ir.layers[1].experts[2].activation = "drelu"
    with pytest.raises(UserError, match="layer 1 mixes activations"):
        lower_cuda(ir, CudaConfig(), tmp_path / "mixed")
    with pytest.raises(UserError, match="65 experts per layer"):
        lower_cuda(make_tiny_ir("mixtral", layers=1, experts=65, top_k=2), CudaConfig(), tmp_path / "many")


def test_moe_decoder_matches_reference_on_cpu():
    """The runtime's MoE layer (dense path: routing, per-expert thresholds, stacked weights), float32 on the CPU."""
    ir = make_tiny_ir("mixtral", "relu", seed=5, experts=4, top_k=2)
    for layer in ir.layers:
        for e, ann in enumerate(layer.experts):
            ann.mode, ann.threshold = "exact", [0.0, 0.01, 0.03, 0.1][e]
    got, want = decode_on_cpu(ir, (5, 77, 300))   # prompt, then three decode steps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
