"""lower(ir, cfg, outdir, ctx): model.onnx (sparse), dense/model.onnx (the baseline), the kernel library."""

from __future__ import annotations

from pathlib import Path

from tscompile.ir import ModelIR

from .builder import IR_VERSION, OPSET, WeightStore, save_model
from .decoder import build_decoder
from .native import LIBRARY_NAME, build_library

EXTERNAL_BYTES = 1536 * 1024**2  # above this the weights go to model.onnx.data (protobuf's limit is 2 GB)


def _weight_bytes(ir: ModelIR) -> int:
    """An upper bound of the initializer bytes: every tensor as float32, plus the lm_head copy of tied models."""
    tied = ir.weights["model.embed_tokens.weight"].numel() if ir.config.tie_word_embeddings else 0
    return 4 * (tied + sum(ir.weights[n].numel() for n in ir.weights))


def write_model(ir: ModelIR, path: Path, sparse: bool, fp16: bool = False) -> None:
    """One decoder to `path` (the folder must exist); external data next to it when the model is large."""
    external = _weight_bytes(ir) > EXTERNAL_BYTES
    store = WeightStore(path.with_name(path.name + ".data") if external else None)
    try:
        model = build_decoder(ir, store, sparse=sparse, fp16=fp16)
    finally:
        store.close()
    save_model(model, path)


def dense_baseline(ir: ModelIR, ctx) -> ModelIR:
    """The dense source model when the build has one, else this IR with every FFN computed densely."""
    source = getattr(ctx, "source_ir", None) if ctx is not None else None
    if source is not None:
        return source
    dense = ir.clone()
    for _, _, ann in dense.ffn_units():
        ann.mode, ann.predictor = "dense", None
    return dense


def lower(ir: ModelIR, cfg, outdir: Path, ctx=None) -> dict:
    outdir = Path(outdir)
    (outdir / "dense").mkdir(parents=True, exist_ok=True)
    fp16 = cfg.dtype == "float16"
    write_model(ir, outdir / "model.onnx", sparse=True, fp16=fp16)
    write_model(dense_baseline(ir, ctx), outdir / "dense" / "model.onnx", sparse=False)
    library = build_library(outdir, getattr(ctx, "log", None)) if cfg.native else None
    modes = [ann.mode for _, _, ann in ir.ffn_units()]
    return {
        "backend": "onnx",
        "model": "model.onnx",
        "dense_model": "dense/model.onnx",
        "native_library": LIBRARY_NAME if library else None,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "dtype": cfg.dtype,
        "sparse_ffns": sum(m != "dense" for m in modes),
        "predictor_ffns": modes.count("predictor"),
        "external_data": (outdir / "model.onnx.data").is_file(),
    }
