"""threshold: FATReLU. Zero every FFN intermediate value with |h| <= t.

t is either given (`value`, one t for every FFN, ProSparse uses 0.01) or calibrated per FFN so that a
`target_sparsity` of h is inactive on calibration text. Calibration streams |h| into a log-spaced histogram
per FFN (memory independent of the token count) and reads the quantile from it.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.ir import ModelIR

# |h| histogram: log2 bins from 2^LOG2_MIN to 2^LOG2_MAX, BINS_PER_OCTAVE per factor of 2 (1.1% wide)
LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -40, 24, 64


class ThresholdConfig(PassConfig):
    value: float | None = Field(None, ge=0, description="one threshold t for every FFN")
    target_sparsity: float | None = Field(None, gt=0, lt=1,
                                          description="calibrate t per FFN to this sparsity")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.value is None) == (self.target_sparsity is None):
            raise ValueError("give exactly one of value or target_sparsity")
        return self

    def data_sections(self, declared: tuple[str, ...]) -> tuple[str, ...]:
        return declared if self.target_sparsity is not None else ()    # a given value reads no text


class AbsHistogram:
    """Streaming histogram of |h| for one FFN: exact zeros counted apart, the rest in log2 bins."""

    def __init__(self):
        import torch
        self.bins = LOG2_MAX - LOG2_MIN
        self.counts = torch.zeros(self.bins * BINS_PER_OCTAVE, dtype=torch.float64)
        self.zeros = 0
        self.total = 0

    def add(self, h) -> None:
        import torch
        a = h.detach().float().abs().flatten()
        nz = a[a > 0]
        self.zeros += a.numel() - nz.numel()
        self.total += a.numel()
        if nz.numel():
            x = nz.log2().clamp(LOG2_MIN, LOG2_MAX - 1e-6)
            self.counts += torch.histc(x, self.counts.numel(), LOG2_MIN, LOG2_MAX).double().cpu()

    def quantile(self, q: float) -> float:
        """The smallest t with a fraction >= q of |h| at or below t (0 when exact zeros already reach q)."""
        import torch
        if self.total == 0:
            return 0.0
        need = q * self.total - self.zeros
        if need <= 0:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        k = int(torch.searchsorted(cum, torch.tensor([need], dtype=torch.float64)))
        k = min(k, len(cum) - 1)
        before = float(cum[k - 1]) if k else 0.0
        frac = (need - before) / max(float(self.counts[k]), 1.0)
        return 2.0 ** (LOG2_MIN + (k + min(max(frac, 0.0), 1.0)) / BINS_PER_OCTAVE)


def calibrate_thresholds(ir: ModelIR, batch, target: float, device: str = "cpu") -> list[float]:
    """Per FFN (ir.ffn_units() order): t such that a fraction `target` of |h| <= t on `batch`."""
    from tscompile.passes.profile import ffn_activations
    hists = [AbsHistogram() for _ in ir.ffn_units()]
    for hs in ffn_activations(ir, batch, device, raw=True):
        for hist, h in zip(hists, hs):
            hist.add(h)
    return [hist.quantile(target) for hist in hists]


def set_thresholds(ir: ModelIR, thresholds: list[float], stats: dict | None = None) -> ModelIR:
    """A copy of `ir` with these thresholds; a dense FFN becomes mode "exact" (h decides what down reads).
    Sparsity and activation frequencies measured before are dropped: they describe the old function (a later
    reorder measures again)."""
    from tscompile.passes.profile import forget_measurements
    out = ir.clone()
    forget_measurements(out)
    for (_, _, ann), t in zip(out.ffn_units(), thresholds):
        ann.threshold = float(t)
        if ann.mode == "dense":
            ann.mode = "exact"
        if stats:
            ann.stats.update(stats)
    return out


def apply_threshold(ir: ModelIR, cfg: ThresholdConfig, ctx: Context) -> ModelIR:
    if cfg.value is not None:
        return set_thresholds(ir, [cfg.value] * len(list(ir.ffn_units())))
    from tscompile.data import calibration_batch
    from tscompile.passes.profile import calib_spec
    batch = calibration_batch(ir, calib_spec(ctx, "threshold"), ctx.device, ctx.seed)
    ts = calibrate_thresholds(ir, batch, cfg.target_sparsity, ctx.device)
    return set_thresholds(ir, ts, {"calibrated_sparsity": cfg.target_sparsity})


PASS = PassInfo(name="threshold", version="2", doc="FATReLU: zero |h| <= t, t given or calibrated per layer",
                config=ThresholdConfig, run=apply_threshold, needs_data=("calib",))
