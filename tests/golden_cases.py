"""The tiny models every backend is checked on (ggml test-backend-ops style: same inputs, one reference).

Each case is deterministic: a family, an activation kind and sparsity annotations on a tiny random model.
Mixtral cases (4 experts, top-2) give every expert the case's annotation and, with `predictor`, its own predictor.
"""
from __future__ import annotations

import functools

from tscompile.tiny import add_random_predictors, make_tiny_ir

PROMPT = [1, 42, 264, 78, 81, 375, 272]   # "<s>Hello sparse world" in the tiny tokenizer
STEPS = 16

CASES = {
    "llama-swiglu": dict(family="llama", activation="swiglu"),
    "mistral-swiglu-window": dict(family="mistral", activation="swiglu", sliding_window=6),
    "qwen2-swiglu-bias-tied": dict(family="qwen2", activation="swiglu"),
    "mistral-geglu": dict(family="mistral", activation="geglu"),
    "mistral-relu-exact": dict(family="mistral", activation="relu", mode="exact"),
    "mistral-drelu-fatrelu": dict(family="mistral", activation="drelu", threshold=0.02, mode="exact"),
    "llama-swiglu-threshold": dict(family="llama", activation="swiglu", threshold=0.05, mode="exact"),
    "mistral-drelu-predictor": dict(family="mistral", activation="drelu", predictor=True),
    "qwen2-swiglu-predictor": dict(family="qwen2", activation="swiglu", threshold=0.02, predictor=True),
    "mixtral-swiglu": dict(family="mixtral", activation="swiglu", experts=4, top_k=2),
    "mixtral-drelu-predictor": dict(family="mixtral", activation="drelu", experts=4, top_k=2, predictor=True),
}


@functools.lru_cache(maxsize=None)
def case_ir(name: str):
    kw = dict(CASES[name])
    threshold, mode, predictor = kw.pop("threshold", 0.0), kw.pop("mode", "dense"), kw.pop("predictor", False)
    ir = make_tiny_ir(seed=7, **kw)
    for _, _, ann in ir.ffn_units():
        ann.threshold, ann.mode = threshold, mode
    return add_random_predictors(ir, rank=8, seed=3) if predictor else ir


def assert_same_greedy(got, want, want_logits, tie: float):
    """Greedy tokens equal; where they part, the reference's logits for the two tokens must be within `tie` of
    each other (relative to the row's largest logit: a near-tie that a reduced-precision target may break either
    way), and the runs stop there."""
    k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        assert len(got) == len(want)
        return
    row = want_logits[k]
    gap = float(row[want[k]] - row[got[k]])
    assert gap <= tie * float(abs(row).max()), f"token {k}: {got[k]} instead of {want[k]}, logit gap {gap:.4f}"
