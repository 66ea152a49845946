"""Lower a ModelIR to the cuda artifact: generated kernel source (+ the nvcc-built library), GPU-layout weights,
manifest.

weights.safetensors, all in the target dtype (names from model.layer_weight_names):
  embed [vocab, H]   norm [H]   lm_head [vocab, H] (untied models)
  layers.{i}.input_norm, post_norm [H]   qkv [(heads + 2 kv_heads) * head_dim, H]   qkv_bias (qwen2)
  layers.{i}.o [H, heads * head_dim]
  layers.{i}.gate, up, down_t [inter, H]   (down_t = down_proj transposed: one contiguous row per neuron)
  layers.{i}.fc1 [rank, H], fc2 [inter, rank]   predictor, rank zero-padded to a multiple of 8 (same logits)
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from tscompile.ir import ModelIR, check_float16_range, ffn_names, predictor_names

from .kernels import LIBRARY, KernelShape, check_shape, compile_library, nvcc_path, render_source
from .model import layer_weight_names
from .moe import moe_shape, moe_weights, render_moe_source

log = logging.getLogger("tscompile")


def kernel_shape(ir: ModelIR, cfg) -> KernelShape:
    c = ir.config
    ranks = [-(-ann.predictor.rank // 8) * 8 for ann in ir.layers if ann.mode == "predictor" and ann.predictor]
    shape = KernelShape(name=ir.display_name(), hidden=c.hidden_size,
                        inter=c.intermediate_size, dtype=cfg.dtype,
                        activations=tuple(sorted({ann.activation for ann in ir.layers})),
                        max_rank=max(ranks, default=0), heads=c.num_heads, kv_heads=c.num_kv_heads,
                        head_dim=c.head_dim)
    check_shape(shape, "targets.cuda")
    return shape


def ffn_spec(ann) -> dict:
    """model.FFNSpec's fields; mode predictor without a predictor is exact gating."""
    gated = ann.mode == "predictor" and ann.predictor is not None
    return {"activation": ann.activation, "threshold": float(ann.threshold),
            "mode": "predictor" if gated else "dense" if ann.mode == "dense" else "exact",
            "predictor_threshold": float(ann.predictor.threshold) if gated else 0.0,
            "predictor_relu": bool(ann.predictor.relu) if gated else True}


def ffn_specs(ir: ModelIR) -> list[dict]:
    """One spec per layer; an MoE layer's also lists its experts' specs (backends/cuda/moe.py)."""
    return [ffn_spec(ann) | ({"experts": [ffn_spec(a) for a in ann.experts]} if ann.experts is not None else {})
            for ann in ir.layers]


def rounded_ir(ir: ModelIR, dtype) -> ModelIR:
    """The same model with every weight rounded to the artifact's dtype (kept in float32): the reference that an
    artifact of that dtype is checked against."""
    out = ir.clone()
    for n in list(out.weights):
        out.weights[n] = out.weights[n].to(dtype).float()
    return out


def gpu_weights(ir: ModelIR, dtype) -> dict:
    """The weight table in the runtime's names and layouts (see the module docstring)."""
    import torch
    c, w = ir.config, ir.weights
    if dtype == torch.float16:   # checked under the checkpoint's names: the table's are the runtime's
        for k, v in w.items():
            if v.is_floating_point():
                check_float16_range(v, k, "cuda", "bfloat16")
    out = {"embed": w["model.embed_tokens.weight"], "norm": w["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["lm_head"] = w["lm_head.weight"]
    for i, ann in enumerate(ir.layers):
        p, n = f"model.layers.{i}", layer_weight_names(i)
        out[n["input_norm"]] = w[f"{p}.input_layernorm.weight"]
        out[n["post_norm"]] = w[f"{p}.post_attention_layernorm.weight"]
        out[n["qkv"]] = torch.cat([w[f"{p}.self_attn.{k}_proj.weight"] for k in "qkv"])
        if c.attention_bias:
            out[n["qkv_bias"]] = torch.cat([w[f"{p}.self_attn.{k}_proj.bias"] for k in "qkv"])
        out[n["o"]] = w[f"{p}.self_attn.o_proj.weight"]
        if ann.experts is not None:   # router and stacked experts (backends/cuda/moe.py)
            out.update(moe_weights(ir, i))
            continue
        gate, up, down = ffn_names(i)
        out[n["gate"]], out[n["up"]], out[n["down_t"]] = w[gate], w[up], w[down].T
        if ann.mode == "predictor" and ann.predictor is not None:
            fc1, fc2 = (w[k] for k in predictor_names(i))
            pad = -fc1.shape[0] % 8
            out[n["fc1"]] = torch.cat([fc1, fc1.new_zeros(pad, fc1.shape[1])])
            out[n["fc2"]] = torch.cat([fc2, fc2.new_zeros(fc2.shape[0], pad)], dim=1)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def lower_cuda(ir: ModelIR, cfg, outdir, ctx=None) -> dict:
    import torch
    from safetensors.torch import save_file
    from tscompile.verify import file_digests
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if ir.config.is_moe:
        shape = moe_shape(ir, cfg)
        source = render_moe_source(shape)
    else:
        shape = kernel_shape(ir, cfg)
        source = render_source(shape)
    (outdir / "ffn.cu").write_text(source)
    compiled = nvcc_path() is not None
    if compiled:
        compile_library(source, cfg.arch, outdir)
    else:
        log.warning("targets.cuda: nvcc not found; wrote ffn.cu only, the runtime compiles it on the GPU machine")
    save_file(gpu_weights(ir, getattr(torch, cfg.dtype)), str(outdir / "weights.safetensors"))
    manifest = {
        "arch": cfg.arch, "dtype": cfg.dtype, "compiled": compiled,
        "library": LIBRARY if compiled else None, "source": "ffn.cu", "weights": "weights.safetensors",
        "arch_config": dataclasses.asdict(ir.config), "ffns": ffn_specs(ir),
        "kernel_shape": dataclasses.asdict(shape),
        "dense_baseline": "load(dense=True): the same kernels and weights, every FFN dense (GEMV for act(gate) * up, "
                          "cuBLAS for down), no predictor",
        "files": file_digests(outdir),
    }
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
