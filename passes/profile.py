"""profile: how often each FFN neuron fires on calibration text (the model is not changed).

Neuron j is active iff h_j != 0 after the FFN's activation and threshold (|h_j| > t). Per FFN the annotation's
`stats` gets the sparsity (fraction inactive over tokens x neurons) and a summary of neuron frequencies; the
per-neuron frequencies go into ir.weights as float32 `{ffn_prefix}.activation_frequency` [inter] (the reorder
pass permutes it with the neurons). `ir.meta["profile"]` holds the model-level sparsity.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.errors import UserError
from tscompile.ir import ModelIR, ffn_label, ffn_prefix

CAPTURE_BYTES = 1 << 30  # h of every FFN for one forward chunk is held at once: about this much at most


class ProfileConfig(PassConfig):
    pass


def frequency_name(layer: int, expert: int | None) -> str:
    return f"{ffn_prefix(layer, expert)}.activation_frequency"


# measured on the FFN's function: stale once a later pass changes it (set by this pass, relufy and reorder)
MEASURED_STATS = ("sparsity", "profile_tokens", "frequency_p10", "frequency_p50", "frequency_p90", "never_active",
                  "hot_20pct_share")


def forget_measurements(ir: ModelIR) -> None:
    """Drop the activation statistics and frequencies of every FFN of `ir` (in place): its function changed."""
    for layer, expert, ann in ir.ffn_units():
        for key in MEASURED_STATS:
            ann.stats.pop(key, None)
        if frequency_name(layer, expert) in ir.weights:
            del ir.weights[frequency_name(layer, expert)]


def refuse_predictors(ir: ModelIR, pass_name: str) -> None:
    """For a pass that changes what the FFNs compute: a predictor fitted before would gate the new function with
    the old one's guesses (and report the old recall)."""
    for layer, expert, ann in ir.ffn_units():
        if ann.predictor is not None:
            raise UserError(f"pipeline {pass_name}: {ffn_label(layer, expert)} has a predictor fitted to the FFN "
                            f"{pass_name} changes; run predictors after {pass_name}")


class _OnlyH(list):
    """An FFN's `capture` that keeps h and drops the input x (half the memory)."""

    def append(self, item):
        super().append(item[1])


def ffn_activations(ir: ModelIR, batch, device: str = "cpu", raw: bool = False) -> Iterator[list]:
    """For each chunk of `batch` [n_seqs, seq_len]: every FFN's h as [tokens, inter], in ir.ffn_units() order.

    raw=True gives the activation before any threshold or predictor (the IR's FFNs read as dense), which
    is what thresholds are calibrated on. MoE experts see only the tokens routed to them.
    """
    import torch
    from tqdm import tqdm
    from tscompile.reference import ReferenceModel
    if raw:
        ir = ir.clone()
        for _, _, ann in ir.ffn_units():
            ann.threshold, ann.mode = 0.0, "dense"
    cfg = ir.config
    model = ReferenceModel.from_ir(ir, device=device)
    ffns = model.ffns()
    token_bytes = 4 * cfg.intermediate_size * cfg.num_layers * max(1, cfg.num_experts_per_tok)
    per_chunk = max(1, CAPTURE_BYTES // (token_bytes * batch.shape[1]))
    try:
        with torch.no_grad():
            for lo in tqdm(range(0, batch.shape[0], per_chunk), desc="calibration forward", unit="chunk",
                           file=sys.stderr, leave=False):
                for f in ffns:
                    f.capture = _OnlyH()
                model(batch[lo:lo + per_chunk].to(device), gating="exact")
                yield [torch.cat([h.reshape(-1, h.shape[-1]) for h in f.capture]) if f.capture
                       else torch.zeros(0, cfg.intermediate_size) for f in ffns]
    finally:
        for f in ffns:
            f.capture = None


def activation_counts(ir: ModelIR, batch, device: str = "cpu") -> tuple[list, list[int]]:
    """Per FFN: how many tokens each neuron was active on (float64 [inter]) and how many tokens it saw."""
    import torch
    units = list(ir.ffn_units())
    counts = [torch.zeros(ir.config.intermediate_size, dtype=torch.float64) for _ in units]
    tokens = [0] * len(units)
    for hs in ffn_activations(ir, batch, device):
        for u, h in enumerate(hs):
            counts[u] += (h != 0).sum(0).double().cpu()
            tokens[u] += h.shape[0]
    return counts, tokens


def apply_profile(ir: ModelIR, cfg: ProfileConfig, ctx: Context) -> ModelIR:
    from tscompile.data import calibration_batch
    batch = calibration_batch(ir, calib_spec(ctx, "profile"), ctx.device, ctx.seed)
    return profile_model(ir, batch, ctx.device)


def calib_spec(ctx: Context, pass_name: str):
    data = getattr(ctx.spec, "data", None)
    if data is None or data.calib is None:
        raise UserError(f"pipeline {pass_name}: needs data.calib in the spec (calibration text)")
    return data.calib


def profile_model(ir: ModelIR, batch, device: str = "cpu") -> ModelIR:
    """A copy of `ir` with activation statistics measured on `batch` [n_seqs, seq_len]."""
    import torch
    counts, tokens = activation_counts(ir, batch, device)
    out = ir.clone()
    sparsities = []
    for (layer, expert, ann), c, n in zip(out.ffn_units(), counts, tokens):
        freq = (c / max(n, 1)).float()
        out.weights[frequency_name(layer, expert)] = freq
        q = torch.quantile(freq, torch.tensor([0.1, 0.5, 0.9])).tolist() if n else [0.0] * 3
        ann.stats.update({
            "sparsity": float(1 - freq.mean()) if n else None, "profile_tokens": n,
            "frequency_p10": q[0], "frequency_p50": q[1], "frequency_p90": q[2],
            "never_active": float((c == 0).float().mean()) if n else None})
        if n:
            sparsities.append(1 - float(freq.mean()))
    out.meta["profile"] = {"sparsity": sum(sparsities) / max(len(sparsities), 1),
                           "tokens": int(batch.numel()), "ffns_seen": len(sparsities)}
    return out


PASS = PassInfo(name="profile", version="1", doc="measure per-layer and per-neuron activation frequency",
                config=ProfileConfig, run=apply_profile, needs_data=("calib",))
