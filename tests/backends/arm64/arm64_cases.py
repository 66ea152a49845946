"""The arm64 tests' tiny models, their stepwise reference, and small helpers (fixtures: conftest.py)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tscompile.ir import ModelIR, Predictor, predictor_names
from tscompile.tiny import make_tiny_ir

PROMPT = [5, 17, 33, 100, 7, 8, 61]
FORCED = [9, 250, 3, 40, 41, 42]


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed")


def add_random_predictors(ir: ModelIR, rank: int, seed: int, relu=(True, False)) -> None:
    """Predictor-mode FFNs with random fc1/fc2 (threshold 0: about half the neurons computed)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    for i, ann in enumerate(ir.layers):
        ann.mode = "predictor"
        ann.predictor = Predictor(rank=rank, threshold=0.0, relu=relu[i % len(relu)])
        fc1, fc2 = predictor_names(i)
        ir.weights[fc1] = torch.randn(rank, H, generator=g) / H ** 0.5
        ir.weights[fc2] = torch.randn(I, rank, generator=g) / rank ** 0.5


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
    if name == "mistral-relu-drelu-predictor-f32":      # sliding window 4 < prompt, two predictor kinds
        ir = make_tiny_ir("mistral", "relu", seed=1, sliding_window=4, intermediate=50)   # 50, 13: kernel tails
        ir.layers[1].activation = "drelu"
        add_random_predictors(ir, rank=13, seed=3)
        for ann in ir.layers:
            ann.threshold = 0.05
        return ir, "float32"
    if name == "qwen2-swiglu-dense-f32":                # qkv bias, tied embeddings, 3 layers
        return make_tiny_ir("qwen2", "swiglu", seed=2, layers=3), "float32"
    if name == "llama-geglu-relu-exact-f16":            # fp16 weights, exact mode, odd shapes (kernel tails)
        ir = odd_shaped_ir("geglu", seed=4)
        ir.layers[1].activation = "relu"
        for ann in ir.layers:
            ann.mode = "exact"
        ir.layers[1].threshold = 0.02
        return ir, "float16"
    raise KeyError(name)


VARIANTS = ("mistral-relu-drelu-predictor-f32", "qwen2-swiglu-dense-f32", "llama-geglu-relu-exact-f16")


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


def stepwise_reference(ir: ModelIR, prompt: list[int], forced: list[int], gating: str = "auto") -> np.ndarray:
    """ReferenceModel fed one token at a time with a KVCache (the arm64 runtime's prefill)."""
    import torch

    from tscompile.reference import KVCache, ReferenceModel
    model = ReferenceModel.from_ir(ir)
    cache = KVCache.empty(ir.config.num_layers)
    rows = []
    with torch.no_grad():
        for i, tok in enumerate(prompt + forced):
            logits = model(torch.tensor([[tok]]), cache=cache, gating=gating)[0, -1]
            if i >= len(prompt) - 1:
                rows.append(logits.numpy())
    return np.stack(rows)


def stepwise_greedy(ir: ModelIR, prompt: list[int], n: int) -> list[int]:
    import torch

    from tscompile.reference import KVCache, ReferenceModel
    model = ReferenceModel.from_ir(ir)
    cache = KVCache.empty(ir.config.num_layers)
    out = []
    with torch.no_grad():
        for tok in prompt:
            logits = model(torch.tensor([[tok]]), cache=cache)[0, -1]
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
    return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
