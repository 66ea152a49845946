"""The arm64 tests' tiny models, their stepwise reference, and small helpers (fixtures: conftest.py)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tscompile.verify import ReferenceRunner

from tscompile.ir import ModelIR
from tscompile.tiny import add_random_predictors, make_tiny_ir

PROMPT = [5, 17, 33, 100, 7, 8, 61]
FORCED = [9, 250, 3, 40, 41, 42]


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed")


def odd_shaped_ir(activation: str, seed: int) -> ModelIR:
    """hidden 60, FFN 50, 4 heads of 18 (q is wider than hidden): no size a multiple of the vector width."""
    import torch

    from tscompile.checkpoint import expected_shapes
    from tscompile.ir import ArchConfig, LayerSparsity, Weights
    from tscompile.tiny import tiny_tokenizer_json
    cfg = ArchConfig(family="llama", vocab_size=384, hidden_size=60, intermediate_size=50, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=18)
    layers = [LayerSparsity(activation=activation) for _ in range(cfg.num_layers)]
    g = torch.Generator().manual_seed(seed)
    weights = {n: 1 + 0.1 * torch.randn(s, generator=g) if n.endswith("norm.weight") else
               torch.randn(s, generator=g) / s[-1] ** 0.5 for n, s in sorted(expected_shapes(cfg, layers).items())}
    return ModelIR(cfg, Weights(tensors=weights), tiny_tokenizer_json(), layers, {"source": "odd-shapes"})


def make_variant(name: str) -> tuple[ModelIR, str]:
    """(ir, dtype) of the named test model."""
    if name.startswith("mistral-relu-drelu-predictor-"):  # sliding window 4 < prompt, two predictor kinds
        ir = make_tiny_ir("mistral", "relu", seed=1, sliding_window=4, intermediate=50)   # 50, 13: kernel tails
        ir = add_random_predictors(ir, rank=13, seed=3)
        ir.layers[1].activation = "drelu"
        ir.layers[1].predictor.relu = False                 # Deja Vu's linear predictor
        f16 = name.endswith("f16")
        for ann in ir.layers:   # fp16 rounding can move an |h| across t: thresholds are checked in fp32 only
            ann.threshold = 0.0 if f16 else 0.05
        return ir, "float16" if f16 else "float32"
    if name == "qwen2-swiglu-dense-f32":                # qkv bias, tied embeddings, 3 layers
        return make_tiny_ir("qwen2", "swiglu", seed=2, layers=3), "float32"
    if name == "llama-geglu-relu-exact-f16":            # fp16 weights, exact mode, odd shapes (kernel tails)
        ir = odd_shaped_ir("geglu", seed=4)
        ir.layers[1].activation = "relu"
        for ann in ir.layers:
            ann.mode = "exact"
        ir.layers[1].threshold = 0.02
        return ir, "float16"
    if name == "mixtral-drelu-experts-f32":         # 4 experts, top-2: per-expert predictors, modes, thresholds
        ir = make_tiny_ir("mixtral", "drelu", seed=5, experts=4, top_k=2, intermediate=50)
        ir = add_random_predictors(ir, rank=13, seed=3)
        ir.layers[1].experts[0].mode = "exact"             # gate computed densely, predictor unused
        ir.layers[1].experts[2].threshold = 0.05
        ir.layers[1].experts[2].predictor.relu = False
        ir.layers[0].experts[3].mode, ir.layers[0].experts[3].predictor = "dense", None
        return ir, "float32"
    if name == "mixtral-bias-predictors-f32":       # every tensor kind: q/k/v bias, router, head, expert predictors
        import torch
        ir = make_tiny_ir("mixtral", "drelu", seed=5, experts=2, top_k=1, layers=1, intermediate=32)
        c, g = ir.config, torch.Generator().manual_seed(0)
        c.attention_bias = True
        for n, d in (("q", c.num_heads * c.head_dim), ("k", c.num_kv_heads * c.head_dim),
                     ("v", c.num_kv_heads * c.head_dim)):
            ir.weights[f"model.layers.0.self_attn.{n}_proj.bias"] = 0.1 * torch.randn(d, generator=g)
        return add_random_predictors(ir, rank=4, seed=3), "float32"
    if name == "mixtral-swiglu-window-f16":         # fp16 weights, 3 experts top-1, sliding window 4 < prompt
        return make_tiny_ir("mixtral", "swiglu", seed=6, experts=3, top_k=1, sliding_window=4), "float16"
    raise KeyError(name)


VARIANTS = ("mistral-relu-drelu-predictor-f32", "qwen2-swiglu-dense-f32", "llama-geglu-relu-exact-f16",
            "mistral-relu-drelu-predictor-f16", "mixtral-drelu-experts-f32", "mixtral-swiglu-window-f16")


@dataclass
class Built:
    name: str
    ir: ModelIR
    dtype: str
    outdir: Path
    manifest: dict
    ref_logits: np.ndarray        # stepwise reference: [1 + len(FORCED), vocab]
    ref_dense_logits: np.ndarray  # same with predictor gating off (what --dense / --exact compute)

    @property
    def tol(self) -> float:
        return 1e-4 if self.dtype == "float32" else 1e-2


def stepwise_reference(ir: ModelIR, prompt: list[int], forced: list[int], gated: bool = True) -> np.ndarray:
    """The reference fed one token at a time with a KV cache (the arm64 runtime's prefill); gated=False turns
    predictor gating off (what --dense / --exact compute)."""
    if not gated:
        ir = ir.clone()
        for _, _, ann in ir.ffn_units():
            ann.mode = "dense"
    return ReferenceRunner(ir, "stepwise").logits(prompt, forced)


def stepwise_greedy(ir: ModelIR, prompt: list[int], n: int) -> list[int]:
    return ReferenceRunner(ir, "stepwise").generate(prompt, n)


