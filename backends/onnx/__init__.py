"""ONNX Runtime backend: the whole decoder with KV cache, sparse FFNs as `ai.tscompile::SparseFFN` nodes.

Artifact (`build/<name>/onnx/`):
    model.onnx (+ model.onnx.data when > 1.5 GB)   the sparse decoder; Optimum input/output names
    dense/model.onnx                              the dense source model, same inputs/outputs (the baseline)
    libtscompile_ort.so, libtscompile_ort.cpp     native SparseFFN kernels (when ORT headers and g++ exist)

Prefill and decode live in ONE graph: each sparse layer's FFN is an `If` on "sequence length > 1". The
prefill branch is the dense exact FFN (Gemm on the [inter, hidden] rows), the decode branch one SparseFFN
node; both read the same weight initializers, so nothing is stored twice. A single-token prompt therefore
takes the sparse branch, exactly as the reference gates any single-token forward. Layers annotated mode
"dense" are plain MatMuls. Mixtral experts are FFNs of the same kind, each inside an If that skips it when no
token is routed to it.

SparseFFN has a model-local function body of standard ops (predictor Gemms, threshold, NonZero, Gather of
rows, MatMul), so stock onnxruntime runs the model; registering libtscompile_ort.so replaces the body with
the native kernel (`load(outdir)` does so whenever the library is there, unless `native=False`).
"""

from __future__ import annotations

from typing import Literal

from tscompile.api import BackendInfo, PassConfig


class OnnxConfig(PassConfig):
    dtype: Literal["float32", "float16"] = (
        "float32"  # of the sparse FFN weights (Wg, Wu, WdT); the rest stays fp32
    )
    native: bool = True  # build the native kernel library


def _lower(ir, cfg, outdir, ctx=None):
    from .lower import lower

    return lower(ir, cfg, outdir, ctx)


def _load(outdir, dense: bool = False, **opts):
    from .runner import load

    return load(outdir, dense=dense, **opts)


def _available() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def _toolchain() -> str:
    """Headers at hand and to be fetched are told apart: a lowering whose fetch failed is redone once they are here."""
    from .native import cxx_compiler, native_possible, ort_headers_here
    if not native_possible():
        return "native kernels: not possible"
    return f"native kernels: {cxx_compiler()}, ORT headers {'here' if ort_headers_here() else 'to fetch'}"


BACKEND = BackendInfo(
    name="onnx",
    version="3",
    doc="ONNX Runtime decoder with SparseFFN (function body + native kernels)",
    config=OnnxConfig,
    lower=_lower,
    load=_load,
    available=_available,
    toolchain=_toolchain,
)
