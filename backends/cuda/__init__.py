"""The cuda target: generated CUDA kernels (predictor, fused sparse gate/up/down, and the rest of a decode step:
GEMVs with the RMSNorm folded in, fused rope + KV-cache write + split-KV attention) compiled with nvcc, and a
runtime that runs each decode step on them (prompts in PyTorch) and replays the step as a CUDA graph.

    targets: {cuda: {arch: sm_90, dtype: bfloat16}}

Artifact (build/<name>/cuda/): ffn.cu (generated source), libtscffn.so (nvcc, when nvcc was found at lowering),
weights.safetensors (Wg, Wu, Wd^T as [inter, hidden]), manifest.json.
"""
from __future__ import annotations

from typing import Literal

from tscompile.api import BackendInfo, PassConfig


class CudaConfig(PassConfig):
    arch: Literal["sm_90", "sm_80"] = "sm_90"             # nvcc target; the runtime rebuilds for another GPU
    dtype: Literal["bfloat16", "float16"] = "bfloat16"    # weights and activations; sums are fp32


def lower(ir, cfg, outdir, ctx=None) -> dict:
    from .lower import lower_cuda
    return lower_cuda(ir, cfg, outdir, ctx)


def load(outdir, dense: bool = False):
    from .runtime import load_runner
    return load_runner(outdir, dense=dense)


def available() -> str | None:
    """None when this machine can run cuda artifacts, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU {torch.cuda.get_device_name()} is older than sm_80 (bf16 loads need Ampere or newer)"
    return None


def toolchain() -> str:
    from .kernels import nvcc_path
    return f"nvcc: {nvcc_path() or 'none'}"


# version: part of a target's cache key; bump it whenever what lower() writes changes (templates, the C interface)
BACKEND = BackendInfo(name="cuda", version="4", doc="generated CUDA sparse-FFN kernels + CUDA-graph decode runtime",
                      config=CudaConfig, lower=lower, load=load, available=available, toolchain=toolchain)
