"""reorder pass: hot-first neuron permutation leaves the model's function unchanged."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from tscompile.passes.profile import frequency_name, profile_model
from tscompile.passes.reorder import ReorderConfig, apply_reorder, order_name, reorder_neurons

from tscompile.api import Context
from tscompile.data import calibration_batch
from tscompile.ir import ffn_names, predictor_names
from tscompile.reference import ReferenceModel
from tscompile.spec import CalibData
from tscompile.tiny import add_random_predictors, make_tiny_ir


def logits(ir, ids, gating):
    with torch.no_grad():
        return ReferenceModel.from_ir(ir)(ids, gating=gating)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 384, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,activation", [("llama", "drelu"), ("mixtral", "relu")])
def test_reorder_keeps_logits_with_predictors(family, activation, ids):
    kw = {"experts": 4, "top_k": 2} if family == "mixtral" else {}
    ir = make_tiny_ir(family, activation, seed=5, layers=2, hidden=64, intermediate=96, **kw)
    ir = add_random_predictors(ir, rank=8, threshold=-0.5)
    ir = profile_model(ir, ids)
    out = ctx_reorder(ir)
    for gating in ("exact", "predictor"):
        want, got = logits(ir, ids, gating), logits(out, ids, gating)
        assert (got - want).abs().max() <= 1e-5
    for layer, expert, ann in out.ffn_units():
        freq = out.weights[frequency_name(layer, expert)]
        assert torch.all(freq[:-1] >= freq[1:]), "not hot first"
        order = out.weights[order_name(layer, expert)].long()
        assert sorted(order.tolist()) == list(range(96))
        before = ir.weights
        g, u, d = ffn_names(layer, expert)
        assert torch.equal(out.weights[g], before[g][order])
        assert torch.equal(out.weights[u], before[u][order])
        assert torch.equal(out.weights[d], before[d][:, order])
        fc2 = predictor_names(layer, expert)[1]
        assert torch.equal(out.weights[fc2], before[fc2][order])
        assert torch.equal(freq, before[frequency_name(layer, expert)][order])
        assert 0.2 <= ann.stats["hot_20pct_share"] <= 1.0
    assert out.meta["reorder"]["ffns"] == len(list(out.ffn_units()))


def ctx_reorder(ir, spec=None):
    ctx = Context(spec=spec, build_dir=None, work_dir=None, log=logging.getLogger("test"))
    return apply_reorder(ir, ReorderConfig(), ctx)


def test_reorder_twice_composes_the_recorded_order(ids):
    ir = profile_model(make_tiny_ir("llama", "relu", seed=6, layers=1, hidden=32, intermediate=48), ids)
    once = reorder_neurons(ir, [ir.weights[frequency_name(0, None)]])
    # a second order (reversed) on top: the recorded order still maps rows to source neurons
    rev = torch.arange(47, -1, -1).float()
    twice = reorder_neurons(once, [rev])
    order = twice.weights[order_name(0, None)].long()
    assert torch.equal(twice.weights[ffn_names(0)[0]], ir.weights[ffn_names(0)[0]][order])
    assert (logits(twice, ids, "exact") - logits(ir, ids, "exact")).abs().max() <= 1e-5


def test_reorder_measures_frequencies_without_a_profile(tmp_path, ids):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. def relu(x): return max(0, x)\n" * 40)
    spec = SimpleNamespace(data=SimpleNamespace(calib=CalibData(mixture=[{"path": str(text)}], tokens=256,
                                                                seq_len=64)))
    ir = make_tiny_ir("qwen2", "drelu", seed=7, layers=2, hidden=32, intermediate=64)
    out = ctx_reorder(ir, spec)
    assert (logits(out, ids, "exact") - logits(ir, ids, "exact")).abs().max() <= 1e-5
    orders = [out.weights[order_name(i, None)] for i in range(2)]
    assert all(not torch.equal(o.long(), torch.arange(64)) for o in orders)
    # profiled afresh on the calibration text the pass measured: hot first
    profiled = profile_model(out, calibration_batch(out, spec.data.calib))
    for i in range(2):
        freq = profiled.weights[frequency_name(i, None)]
        assert freq[0] > freq[-1] and torch.all(freq[:-1] >= freq[1:]), f"layer {i}: not hot first"


@pytest.mark.parametrize("which,value,error", [
    ("frequency", torch.rand(100), r"activation_frequency has shape \(100,\), expected \(48,\): one value per neuron"),
    ("frequency", torch.rand(300), r"activation_frequency has shape \(300,\), expected \(48,\)"),
    ("order", torch.zeros(48, dtype=torch.int32), r"neuron_order is not a permutation of 0..47"),
], ids=["frequencies too few", "frequencies too many", "order not a permutation"])
def test_per_neuron_tensors_that_do_not_fit_the_ffn_are_refused(which, value, error, ids):
    """A source checkpoint's frequencies of another length had truncated the FFN (exit 0) or crashed (exit 3)."""
    from tscompile.errors import UserError
    ir = profile_model(make_tiny_ir("llama", "relu", seed=6, layers=1, hidden=32, intermediate=48), ids)
    ir.weights[frequency_name(0, None) if which == "frequency" else order_name(0, None)] = value
    with pytest.raises(UserError, match=r"^pipeline reorder: tensor model\.layers\.0\.mlp\." + error):
        ctx_reorder(ir)
