"""drelu: swap every FFN's activation for dReLU, relu(x Wg) * relu(x Wu) (TurboSparse Eq. 2), or ReGLU,
relu(x Wg) * (x Wu). Only the annotation changes; the weights stay. Without the ReLUfication fine-tune that
follows (relufy) the model's quality collapses: this pass only sets the function the fine-tune trains.
"""
from __future__ import annotations

from typing import Literal

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.ir import ModelIR


class DReLUConfig(PassConfig):
    kind: Literal["drelu", "relu"] = "drelu"


def apply_drelu(ir: ModelIR, cfg: DReLUConfig, ctx: Context) -> ModelIR:
    from tscompile.passes.profile import forget_measurements, refuse_predictors
    refuse_predictors(ir, "drelu")
    out = ir.clone()
    forget_measurements(out)   # the old activation's sparsity and frequencies (a later reorder measures again)
    for layer in out.layers:
        layer.activation = cfg.kind          # an MoE layer's own entry too, so it agrees with its experts
    for _, _, ann in out.ffn_units():
        ann.activation = cfg.kind
    return out


PASS = PassInfo(name="drelu", version="2", config=DReLUConfig, run=apply_drelu,
                doc="set every FFN activation to dReLU (or ReGLU); weights unchanged")
