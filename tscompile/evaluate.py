"""Perplexity and FFN activation sparsity of a ModelIR on a text, measured with the reference model."""
from __future__ import annotations

import math
import sys

from .errors import UserError
from .ir import ModelIR


class SparsityCounter:
    """Stands in for an FFN's `capture` list: counts zeros of h as the forward runs instead of keeping h."""

    def __init__(self):
        self.zeros = 0
        self.total = 0

    def append(self, item):
        _, h = item
        self.zeros += int((h == 0).sum())
        self.total += h.numel()


def text_token_ids(ir: ModelIR, path: str, tokens: int | None = None) -> list[int]:
    """Token ids of the text at `path` (a file, a directory or corpus:NAME, see `tscompile.data.resolve_texts`):
    its documents (files, or DOC_SEP-separated parts) joined with the end-of-text token, cut to `tokens`."""
    from .data import DOC_SEP, read_utf8, resolve_texts, separator_id, tokenizer_of
    tok = tokenizer_of(ir)
    sep = separator_id(tok)
    ids: list[int] = []
    for f in resolve_texts(path):
        for doc in (d for d in read_utf8(f).split(DOC_SEP) if d.strip()):
            if ids:
                ids.append(sep)
            ids.extend(tok.encode(doc).ids)
        if tokens is not None and len(ids) >= tokens:
            break
    ids = ids[:tokens] if tokens is not None else ids
    if len(ids) < 2:
        raise UserError(f"{path}: fewer than 2 tokens of text to evaluate on")
    return ids


def evaluate_text(ir: ModelIR, path: str, tokens: int | None = None, seq_len: int = 1024,
                  gating: str = "exact") -> dict:
    """Perplexity over non-overlapping windows of `seq_len` tokens (the first `tokens` of the text, or all),
    and the fraction of FFN intermediate values h that are exactly zero, per layer and on average.

    `gating` is passed to the reference forward: "exact" = the dense function, "predictor" = predictor-gated
    FFNs on every token (what a sparse decode computes).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from .reference import GATINGS, ReferenceModel
    if gating not in GATINGS:
        raise UserError(f"gating {gating!r} is not one of {', '.join(GATINGS)}")
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    ids = text_token_ids(ir, path, tokens)
    from .data import check_window
    check_window(ir, min(seq_len, len(ids)), f"eval of {path}")   # a text shorter than seq_len is one window
    model = ReferenceModel.from_ir(ir)
    units = list(ir.ffn_units())
    counters = [SparsityCounter() for _ in units]
    for ffn, counter in zip(model.ffns(), counters):
        ffn.capture = counter
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll, predicted = 0.0, 0
    try:
        with torch.no_grad():
            for w in tqdm(windows, desc="eval", unit="window", file=sys.stderr):
                x = torch.tensor([w])
                logits = model(x, gating=gating)[0, :-1]
                nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
                predicted += len(w) - 1
    finally:
        for ffn in model.ffns():
            ffn.capture = None
    layer_zeros = [0] * ir.config.num_layers
    layer_total = [0] * ir.config.num_layers
    for (layer, _, _), c in zip(units, counters):
        layer_zeros[layer] += c.zeros
        layer_total[layer] += c.total
    layer_sparsity = [z / t if t else 0.0 for z, t in zip(layer_zeros, layer_total)]
    return {"perplexity": math.exp(nll / predicted), "tokens": sum(map(len, windows)),   # a 1-token tail is not read
            "sparsity": sum(layer_sparsity) / len(layer_sparsity), "layer_sparsity": layer_sparsity}
