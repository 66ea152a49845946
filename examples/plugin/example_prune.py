"""Example tscompile plug-in pass: zero the FFN neurons with the smallest weight norms.

A neuron j of an FFN is scored by ||Wg[j]|| * ||Wu[j]|| * ||Wd[:, j]|| (how much it can contribute);
the lowest `fraction` of each FFN are pruned by zeroing their gate/up rows and down column, so they
never fire (h_j = act(0) * 0 = 0). The count lands in the layer's sparsity stats.

Everything a pass needs: a config class (pydantic, unknown keys rejected), a function
(ir, cfg, ctx) -> ir, and a PassInfo named by the entry point in pyproject.toml. torch is imported
inside the function so that `tscompile passes` stays fast.
"""
from __future__ import annotations

from pydantic import Field

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.ir import ModelIR, ffn_names


class PruneNeuronsConfig(PassConfig):
    fraction: float = Field(0.1, ge=0, lt=1, description="share of each FFN's neurons to zero")


def prune_neurons(ir: ModelIR, cfg: PruneNeuronsConfig, ctx: Context) -> ModelIR:
    import torch
    total = 0
    for layer, expert, ann in ir.ffn_units():
        g, u, d = ffn_names(layer, expert)
        wg, wu, wd = ir.weights[g], ir.weights[u], ir.weights[d]
        score = wg.float().norm(dim=1) * wu.float().norm(dim=1) * wd.float().norm(dim=0)
        n_pruned = int(cfg.fraction * score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[torch.argsort(score, stable=True)[:n_pruned]] = False
        # New tensors, never in-place: the input's tensors may be shared with the cached source model.
        ir.weights[g] = wg * keep[:, None].to(wg.dtype)
        ir.weights[u] = wu * keep[:, None].to(wu.dtype)
        ir.weights[d] = wd * keep[None, :].to(wd.dtype)
        ann.stats["pruned_neurons"] = n_pruned
        total += n_pruned
    ctx.log.info("prune_neurons: zeroed %d neurons (%.0f%% of each FFN)", total, 100 * cfg.fraction)
    return ir


PASS = PassInfo(name="prune_neurons", version="1",
                doc="zero each FFN's weakest neurons by weight norm (example plug-in)",
                config=PruneNeuronsConfig, run=prune_neurons)
