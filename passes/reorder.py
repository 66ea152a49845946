"""reorder: permute FFN neurons by activation frequency, hot first (PowerInfer's hot/cold layout).

A backend that keeps or caches a prefix of rows (hot neurons in fast memory, cold ones streamed) gets the hot
ones contiguous. The permutation is applied consistently to Wg and Wu rows, Wd columns, the predictor's fc2
rows and the per-neuron frequency statistics, so the model computes the same function. Frequencies come from the
profile pass (`{ffn_prefix}.activation_frequency`) or are measured on calibration text when missing.
`{ffn_prefix}.neuron_order` (int32 [inter]) records, for each row, the neuron's index in the source model.
"""
from __future__ import annotations

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.errors import UserError
from tscompile.ir import ModelIR, ffn_names, ffn_prefix, predictor_names


class ReorderConfig(PassConfig):
    pass


def order_name(layer: int, expert: int | None) -> str:
    return f"{ffn_prefix(layer, expert)}.neuron_order"


def hot_first(freq):
    """Row order: most frequently active neuron first (stable, so ties keep their order)."""
    import torch
    return torch.argsort(freq.float(), descending=True, stable=True)


def permute_neurons(ir: ModelIR, layer: int, expert: int | None, perm) -> None:
    """Reorder one FFN's neurons in place: new row k is old neuron perm[k]."""
    import torch
    from tscompile.passes.profile import frequency_name
    w = ir.weights
    gate, up, down = ffn_names(layer, expert)
    w[gate], w[up] = w[gate][perm].contiguous(), w[up][perm].contiguous()
    w[down] = w[down][:, perm].contiguous()
    fc2 = predictor_names(layer, expert)[1]
    if fc2 in w:
        w[fc2] = w[fc2][perm].contiguous()
    freq = frequency_name(layer, expert)
    if freq in w:
        w[freq] = w[freq][perm].contiguous()
    name = order_name(layer, expert)
    before = w[name].long() if name in w else torch.arange(len(perm))
    w[name] = before[perm].to(torch.int32)


def reorder_neurons(ir: ModelIR, freqs: list) -> ModelIR:
    """A copy of `ir` with every FFN's neurons sorted hot first by `freqs` (ir.ffn_units() order)."""
    out = ir.clone()
    for (layer, expert, ann), freq in zip(out.ffn_units(), freqs):
        perm = hot_first(freq)
        permute_neurons(out, layer, expert, perm)
        f = freq[perm].float()
        ann.stats["hot_20pct_share"] = float(f[:max(1, len(f) // 5)].sum() / f.sum()) if f.sum() > 0 else None
    out.meta["reorder"] = {"by": "activation_frequency", "ffns": len(freqs)}
    return out


def check_per_neuron(ir: ModelIR) -> None:
    """The per-neuron tensors of every FFN (from a source checkpoint or an earlier pass) index its rows: one of
    another length would truncate the weights, or fail as an internal error."""
    import torch
    from tscompile.passes.profile import frequency_name
    inter = ir.config.intermediate_size
    for layer, expert, _ in ir.ffn_units():
        for name in (frequency_name(layer, expert), order_name(layer, expert)):
            if name in ir.weights and (shape := tuple(ir.weights.info(name)[0])) != (inter,):
                raise UserError(f"pipeline reorder: tensor {name} has shape {shape}, expected ({inter},): one value "
                                "per neuron")
        order = order_name(layer, expert)
        if order in ir.weights and not torch.equal(ir.weights[order].long().sort().values, torch.arange(inter)):
            raise UserError(f"pipeline reorder: tensor {order} is not a permutation of 0..{inter - 1}")


def apply_reorder(ir: ModelIR, cfg: ReorderConfig, ctx: Context) -> ModelIR:
    from tscompile.passes.profile import frequency_name
    check_per_neuron(ir)
    units = list(ir.ffn_units())
    if all(frequency_name(layer, expert) in ir.weights for layer, expert, _ in units):
        freqs = [ir.weights[frequency_name(layer, expert)] for layer, expert, _ in units]
    else:
        from tscompile.passes.profile import activation_counts, calib_spec

        from tscompile.data import calibration_batch
        batch = calibration_batch(ir, calib_spec(ctx, "reorder"), ctx.device, ctx.seed)
        counts, tokens = activation_counts(ir, batch, ctx.device)
        freqs = [c / max(n, 1) for c, n in zip(counts, tokens)]
        ctx.log.info("reorder: no profile in the model; measured frequencies on %d calibration tokens",
                     batch.numel())
    return reorder_neurons(ir, freqs)


PASS = PassInfo(name="reorder", version="1", doc="permute FFN neurons hot first by activation frequency",
                config=ReorderConfig, run=apply_reorder, needs_data=("calib",))
