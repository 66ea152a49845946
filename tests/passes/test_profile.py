"""profile: per-FFN sparsity and per-neuron activation frequency, stored in the IR; the profile plot."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tscompile.api import Context
from tscompile.ir import ffn_names
from tscompile.passes.profile import PASS, ProfileConfig, frequency_name, profile_model
from tscompile.spec import CalibData, DataSpec
from tscompile.tiny import make_tiny_ir


def direct_frequencies(ir, batch):
    """Per FFN of a dense (non-MoE) model: the share of tokens where |h_j| > t, computed from the weights."""
    from tscompile.reference import ReferenceModel, activate
    model = ReferenceModel.from_ir(ir)
    inputs = []
    for f in model.ffns():
        f.capture = inputs
    with torch.no_grad():
        model(batch)
    out = []
    for (layer, _, ann), (x, _) in zip(ir.ffn_units(), inputs):
        wg, wu, _ = (ir.weights[n] for n in ffn_names(layer))
        h = activate(ann.activation, x @ wg.T, x @ wu.T).reshape(-1, wg.shape[0])
        out.append((h.abs() > ann.threshold).float().mean(0))
    return out


def test_frequencies_and_sparsity_match_direct_count(tmp_path):
    ir = make_tiny_ir("mistral", "drelu", seed=4, layers=3)
    for _, _, ann in ir.ffn_units():
        ann.threshold = 0.02
    batch = torch.randint(0, ir.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    out = profile_model(ir, batch)
    want = direct_frequencies(ir, batch)
    sparsities = []
    for (layer, expert, ann), freq in zip(out.ffn_units(), want):
        got = out.weights[frequency_name(layer, expert)]
        assert got.dtype == torch.float32 and got.shape == (ir.config.intermediate_size,)
        torch.testing.assert_close(got, freq, atol=1.5 / batch.numel(), rtol=0)   # a token of slack: ties
        assert ann.stats["sparsity"] == pytest.approx(1 - float(freq.mean()), abs=1e-3)
        assert ann.stats["profile_tokens"] == batch.numel()
        assert ann.stats["frequency_p10"] <= ann.stats["frequency_p50"] <= ann.stats["frequency_p90"]
        sparsities.append(ann.stats["sparsity"])
    assert 0.7 < out.meta["profile"]["sparsity"] == pytest.approx(sum(sparsities) / 3)
    assert "activation_frequency" not in "".join(ir.weights)          # the input IR is untouched
    out.save(tmp_path / "ckpt")                                      # survives the sparse checkpoint
    from tscompile.ir import ModelIR
    back = ModelIR.load(tmp_path / "ckpt")
    assert back.weights[frequency_name(0, None)].equal(out.weights[frequency_name(0, None)])
    assert back.layers[0].stats["sparsity"] == out.layers[0].stats["sparsity"]


def test_moe_experts_profiled_separately():
    ir = make_tiny_ir("mixtral", "relu", seed=0, experts=4, top_k=2)
    batch = torch.randint(0, ir.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    out = profile_model(ir, batch)
    seen = [ann.stats["profile_tokens"] for _, _, ann in out.ffn_units()]
    assert len(seen) == ir.config.num_layers * 4
    for layer in range(ir.config.num_layers):    # top-2 routing: every token reaches two experts
        assert sum(seen[layer * 4:(layer + 1) * 4]) == 2 * batch.numel()


def test_pass_uses_calibration_text(tmp_path):
    ir = make_tiny_ir("qwen2", "relu", seed=1)
    calib = CalibData(mixture=[{"path": "corpus:prose"}], tokens=1024, seq_len=128)
    ctx = Context(spec=SimpleNamespace(data=DataSpec(calib=calib)), build_dir=tmp_path, work_dir=tmp_path)
    out = PASS.run(ir, ProfileConfig(), ctx)
    assert out.meta["profile"]["tokens"] == 1024
    assert 0.3 < out.meta["profile"]["sparsity"] < 0.7        # ReGLU: relu(g) is zero about half the time
