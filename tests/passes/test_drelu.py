"""drelu: the activation annotation changes on every FFN (MoE experts too); the weights do not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tscompile.errors import UserError
from tscompile.ir import ffn_names
from tscompile.passes.drelu import PASS, DReLUConfig
from tscompile.passes.profile import frequency_name, profile_model
from tscompile.reference import ReferenceModel
from tscompile.tiny import add_random_predictors, make_tiny_ir


def _ffn_io(ir, ids):
    """(x, h) captured at every FFN in ir.ffn_units() order."""
    model = ReferenceModel.from_ir(ir)
    for f in model.ffns():
        f.capture = []
    with torch.no_grad():
        logits = model(ids)
    return [f.capture[0] for f in model.ffns()], logits


@pytest.mark.parametrize("kind", ["drelu", "relu"])
def test_substitution_is_exact_vs_direct_formula(kind):
    ir = make_tiny_ir("mistral", "swiglu", seed=3)
    out = PASS.run(ir, DReLUConfig(kind=kind), None)
    assert [a.activation for _, _, a in out.ffn_units()] == [kind] * ir.config.num_layers
    assert [a.activation for _, _, a in ir.ffn_units()] == ["swiglu"] * ir.config.num_layers   # input kept
    assert all(out.weights[n].equal(ir.weights[n]) for n in ir.weights)
    ids = torch.randint(0, ir.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    captured, logits = _ffn_io(out, ids)
    for (layer, _, _), (x, h) in zip(out.ffn_units(), captured):
        wg, wu, _ = (out.weights[n] for n in ffn_names(layer))
        g, u = x @ wg.T, x @ wu.T
        want = F.relu(g) * (F.relu(u) if kind == "drelu" else u)
        torch.testing.assert_close(h, want, rtol=0, atol=1e-6)
        assert (h == 0).float().mean() > (0.7 if kind == "drelu" else 0.45)
    _, dense_logits = _ffn_io(ir, ids)
    assert (logits - dense_logits).abs().max() > 1e-3     # the function did change


def test_every_moe_expert_is_switched():
    ir = make_tiny_ir("mixtral", "swiglu", seed=1, experts=4, top_k=2)
    out = PASS.run(ir, DReLUConfig(), None)
    units = list(out.ffn_units())
    assert len(units) == ir.config.num_layers * 4
    assert all(a.activation == "drelu" for _, _, a in units)
    assert all(layer.activation == "drelu" for layer in out.layers)


def test_config_rejects_unknown_kind():
    with pytest.raises(ValidationError):
        DReLUConfig(kind="gelu")
    with pytest.raises(ValidationError):
        DReLUConfig(threshold=0.1)


def test_the_old_activations_measurements_are_dropped_and_a_predictor_refused():
    """They describe the SwiGLU FFN: a later reorder would sort by them (all neurons fire) and do nothing."""
    ir = make_tiny_ir("mistral", "swiglu", seed=3)
    ids = torch.randint(0, ir.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    profiled = profile_model(ir, ids)
    assert frequency_name(0, None) in profiled.weights and "sparsity" in profiled.layers[0].stats
    out = PASS.run(profiled, DReLUConfig(), None)
    for layer, expert, ann in out.ffn_units():
        assert frequency_name(layer, expert) not in out.weights and "sparsity" not in ann.stats
    gated = add_random_predictors(make_tiny_ir("mistral", "relu", seed=3), rank=8, threshold=0.0)
    with pytest.raises(UserError, match=r"^pipeline drelu: layer 0 has a predictor fitted to the FFN drelu "
                                        r"changes; run predictors after drelu$"):
        PASS.run(gated, DReLUConfig(), None)
