"""Tiny models for the onnx backend tests: predictors set directly (random fc1/fc2, ~65% of neurons gated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tscompile.verify import ReferenceRunner

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
FORCED = [33, 32, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111]
THRESHOLD = 0.02  # FATReLU threshold on |h| (every activation kind)
GATED = 0.65  # fraction of neurons the predictor switches off
# one family per activation so every kind and every architecture feature is covered
FAMILIES = {"swiglu": "mistral", "geglu": "qwen2", "relu": "llama", "drelu": "mistral"}


def sparsify(ir, mode: str, rank: int = 16, seed: int = 1):
    """A copy of `ir` with every FFN in `mode`: threshold THRESHOLD, and random predictors gating GATED of the
    neurons on this test's own hidden states (threshold = that quantile of the predictor logits)."""
    import torch

    from tscompile.ir import Predictor, predictor_names
    from tscompile.reference import ReferenceModel

    out = ir.clone()
    ref = ReferenceModel.from_ir(ir)
    for f in ref.ffns():
        f.capture = []
    with torch.no_grad():
        ref(torch.tensor([PROMPT + FORCED]))
    gen = torch.Generator().manual_seed(seed)
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    for (layer, expert, ann), f in zip(out.ffn_units(), ref.ffns()):
        x = f.capture[0][0][0]  # [T, H] FFN inputs of the test text
        fc1 = torch.randn(rank, H, generator=gen) / H**0.5
        fc2 = torch.randn(I, rank, generator=gen) / rank**0.5
        n1, n2 = predictor_names(layer, expert)
        out.weights[n1], out.weights[n2] = fc1, fc2
        ann.mode, ann.threshold = mode, THRESHOLD
        if mode == "predictor":
            logits = fc2 @ torch.relu(fc1 @ x.T)
            ann.predictor = Predictor(rank, float(logits.flatten().quantile(GATED)), True)
    return out


def reference_logits(ir, prompt=PROMPT, forced=FORCED) -> np.ndarray:
    """ReferenceModel: prefill the prompt, then teacher-forced decode -> [1 + len(forced), vocab]."""
    return ReferenceRunner(ir, "batched").logits(prompt, forced)


class Lowered:
    def __init__(self, source, ir, outdir: Path, manifest: dict):
        self.source, self.ir, self.outdir, self.manifest = source, ir, outdir, manifest


def lower_tiny(activation: str, mode: str, outdir: Path, dtype: str = "float32", family: str = "") -> Lowered:
    from tscompile.backends.onnx import BACKEND, OnnxConfig

    from tscompile.api import Context
    from tscompile.tiny import make_tiny_ir

    family = family or FAMILIES[activation]
    moe = {"experts": 4, "top_k": 2} if family == "mixtral" else {}
    source = make_tiny_ir(family, activation, seed=3, sliding_window=8 if family == "mistral" else None, **moe)
    ir = sparsify(source, mode)
    ctx = Context(spec=None, build_dir=outdir, work_dir=outdir, source_ir=source)
    manifest = BACKEND.lower(ir, OnnxConfig(dtype=dtype), outdir, ctx)
    return Lowered(source, ir, outdir, manifest)
