"""Renders the C runtime (templates/*.j2) for one model: sources, CMakeLists.txt and toolchain file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tscompile.errors import UserError
from tscompile.ir import ModelIR, ffn_label

from .blob import BLOB_VERSION, ffn_spec_values

TEMPLATES = Path(__file__).parent / "templates"
# generated file -> template; kernels_neon*.c are only compiled for aarch64
SOURCES = {
    "model.h": "model.h.j2", "kernels.h": "kernels.h.j2", "tokenizer.h": "tokenizer.h.j2",
    "kernels_scalar.c": "kernels_scalar.c.j2", "kernels_neon.c": "kernels_neon.c.j2",
    "kernels_neon_fp16.c": "kernels_neon_fp16.c.j2", "pool.c": "pool.c.j2", "weights.c": "weights.c.j2",
    "forward.c": "forward.c.j2", "ffn.c": "ffn.c.j2", "tokenizer.c": "tokenizer.c.j2", "main.c": "main.c.j2",
}
KERNEL_FILES = ("kernels_scalar.c", "kernels_neon.c", "kernels_neon_fp16.c")
NEON_FILES = ("kernels_neon.c", "kernels_neon_fp16.c")
FP16_ARITH_FILE = "kernels_neon_fp16.c"
ACT_ENUMS = {"swiglu": "ACT_SWIGLU", "geglu": "ACT_GEGLU", "relu": "ACT_RELU", "drelu": "ACT_DRELU"}
MODE_ENUMS = {"dense": "MODE_DENSE", "exact": "MODE_EXACT", "predictor": "MODE_PREDICTOR"}


def c_float(x: float) -> str:
    """A C float literal that reads back as exactly this float32."""
    s = format(float(np.float32(x)), ".9g")
    if not any(ch in s for ch in ".en"):
        s += ".0"
    return s + "f"


def check_supported(ir: ModelIR) -> None:
    c = ir.config
    where = f"arm64 backend ({ir.meta.get('source', 'model')})"
    if c.head_dim % 2 or c.num_heads % c.num_kv_heads:
        raise UserError(f"{where}: head_dim must be even and num_heads a multiple of num_kv_heads")
    for i, e, ann in ir.ffn_units():
        if ann.predictor is not None and not 0 < ann.predictor.rank <= c.intermediate_size:
            unit = f"layers[{i}]" if e is None else f"layers[{i}].experts[{e}]"
            raise UserError(f"{where}: {unit}.predictor.rank {ann.predictor.rank} is outside "
                            f"1..{c.intermediate_size}")


def template_context(ir: ModelIR, dtype: str) -> dict:
    c = ir.config
    ffns = []      # one per FFN, in ModelIR.ffn_units() order (the order of FFN_SPECS and the blob header)
    for i, e, ann in ir.ffn_units():
        _, _, rank, relu, thr, pthr = ffn_spec_values(ann)
        summary = f"{ann.activation}, {ann.mode}, threshold {thr:g}"
        if rank:
            summary += f", predictor rank {rank}{'' if relu else ' (linear)'} >= {pthr:g}"
        ffns.append({"unit": ffn_label(i, e),
                     "act_enum": ACT_ENUMS[ann.activation], "mode_enum": MODE_ENUMS[ann.mode], "rank": rank,
                     "relu": relu, "threshold": c_float(thr), "pred_threshold": c_float(pthr),
                     "summary": summary})
    return {
        "name": ir.display_name(), "family": c.family,
        "dim": c.hidden_size, "hidden_dim": c.intermediate_size, "n_layers": c.num_layers,
        "n_heads": c.num_heads, "n_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
        "n_experts": c.num_experts, "top_k": c.num_experts_per_tok,
        "sliding_window": c.sliding_window or 0, "rms_eps": c_float(c.rms_norm_eps),
        "bos_id": -1 if c.bos_token_id is None else c.bos_token_id,
        "eos_id": c.eos_ids[0] if c.eos_ids else -1, "eos_ids": c.eos_ids or (-1,),
        "dtype_name": dtype, "dtype_enum": 1 if dtype == "float16" else 0,
        "attn_bias": c.attention_bias, "tied": c.tie_word_embeddings, "ffns": ffns,
        "blob_version": BLOB_VERSION,
    }


def _environment():
    import jinja2
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


def render_sources(ir: ModelIR, dtype: str) -> dict[str, str]:
    """Generated C sources: file name -> text."""
    check_supported(ir)
    env = _environment()
    ctx = template_context(ir, dtype)
    return {name: env.get_template(tpl).render(**ctx) for name, tpl in SOURCES.items()}


def render_build_files(android_ndk: str | None, qemu_cpu: str = "cortex-a76") -> dict[str, str]:
    """CMakeLists.txt and the cross toolchain file (Android NDK's when one is given; else ctest runs under qemu
    emulating qemu_cpu)."""
    env = _environment()
    ctx = {"sources": [n for n in SOURCES if n.endswith(".c") and n not in NEON_FILES],
           "neon_sources": [n for n in NEON_FILES if n != FP16_ARITH_FILE], "fp16_source": FP16_ARITH_FILE,
           "android_ndk": android_ndk, "qemu_cpu": qemu_cpu}
    return {"CMakeLists.txt": env.get_template("CMakeLists.txt.j2").render(**ctx),
            "toolchain-aarch64.cmake": env.get_template("toolchain-aarch64.cmake.j2").render(**ctx)}
