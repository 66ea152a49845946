"""magnitude: training-free activation sparsity for unmodified SwiGLU/GeGLU models (CATS/TEAL style).

Per FFN, a threshold t on |h| = |act(x Wg) * (x Wu)| calibrated so that a fraction `sparsity` of h is at or
below it on calibration text; the FFN keeps its activation and becomes mode "exact" (down reads only the
active rows of Wd). Thresholding h itself (not the gate alone, as CATS does) drops the smallest terms of the
down projection's input.
"""
from __future__ import annotations

from pydantic import Field

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.ir import ModelIR


class MagnitudeConfig(PassConfig):
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of FFN intermediate values to zero")


def apply_magnitude(ir: ModelIR, cfg: MagnitudeConfig, ctx: Context) -> ModelIR:
    from tscompile.data import calibration_batch
    from tscompile.passes.profile import calib_spec
    from tscompile.passes.threshold import calibrate_thresholds, set_thresholds
    batch = calibration_batch(ir, calib_spec(ctx, "magnitude"), ctx.device, ctx.seed)
    ts = calibrate_thresholds(ir, batch, cfg.sparsity, ctx.device)
    return set_thresholds(ir, ts, {"calibrated_sparsity": cfg.sparsity})


PASS = PassInfo(name="magnitude", version="2", config=MagnitudeConfig, run=apply_magnitude, needs_data=("calib",),
                doc="training-free: per-layer |h| thresholds to a target sparsity")
