"""threshold (FATReLU): a given t, or t calibrated per FFN to a target sparsity on calibration text."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from tscompile.api import Context
from tscompile.data import calibration_batch
from tscompile.errors import UserError
from tscompile.passes.profile import activation_counts
from tscompile.passes.threshold import PASS, AbsHistogram, ThresholdConfig
from tscompile.spec import CalibData, DataSpec
from tscompile.tiny import make_tiny_ir

CALIB = CalibData(mixture=[{"path": "corpus:prose"}, {"path": "corpus:code"}], tokens=4096, seq_len=128)


def calib_context(calib=CALIB) -> Context:
    return Context(spec=SimpleNamespace(data=DataSpec(calib=calib)), build_dir=Path("."), work_dir=Path("."))


def ffn_sparsity(ir, batch) -> list[float]:
    counts, tokens = activation_counts(ir, batch)
    return [1 - float(c.sum()) / (n * c.numel()) for c, n in zip(counts, tokens)]


@pytest.mark.parametrize("family,activation,target", [("mistral", "drelu", 0.9), ("llama", "relu", 0.8),
                                                      ("qwen2", "swiglu", 0.6), ("mixtral", "drelu", 0.85)])
def test_calibrated_thresholds_hit_target_sparsity(family, activation, target):
    kw = {"experts": 4, "top_k": 2} if family == "mixtral" else {}
    ir = make_tiny_ir(family, activation, seed=2, **kw)
    out = PASS.run(ir, ThresholdConfig(target_sparsity=target), calib_context())
    batch = calibration_batch(out, CALIB)
    got = ffn_sparsity(out, batch)
    assert all(abs(s - target) <= 0.01 for s in got), got
    for _, _, ann in out.ffn_units():
        assert ann.threshold > 0 and ann.mode == "exact" and ann.stats["calibrated_sparsity"] == target
    assert all(ann.threshold == 0 for _, _, ann in ir.ffn_units())      # the input IR is untouched


def test_target_below_natural_sparsity_keeps_zero_threshold():
    ir = make_tiny_ir("mistral", "drelu", seed=0)        # ~75% of dReLU outputs are exactly zero
    out = PASS.run(ir, ThresholdConfig(target_sparsity=0.3), calib_context())
    assert all(ann.threshold == 0.0 for _, _, ann in out.ffn_units())


def test_given_value_zeroes_small_activations():
    ir = make_tiny_ir("mistral", "relu", seed=0)
    out = PASS.run(ir, ThresholdConfig(value=0.05), None)
    assert all(ann.threshold == 0.05 for _, _, ann in out.ffn_units())
    from tscompile.passes.profile import ffn_activations
    batch = torch.randint(0, ir.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    for hs in ffn_activations(out, batch):
        for h in hs:
            small = (h.abs() > 0) & (h.abs() <= 0.05)
            assert not small.any() and (h.abs() > 0.05).any()


def test_measurements_of_the_old_function_are_dropped():
    from tscompile.passes.profile import PASS as PROFILE
    from tscompile.passes.profile import frequency_name
    profiled = PROFILE.run(make_tiny_ir("llama", "relu"), PROFILE.config(), calib_context())
    assert "sparsity" in profiled.layers[0].stats and frequency_name(0, None) in profiled.weights
    out = PASS.run(profiled, ThresholdConfig(value=0.05), calib_context())
    assert not {"sparsity", "frequency_p50", "never_active"} & set(out.layers[0].stats)   # they were before
    assert frequency_name(0, None) not in out.weights and frequency_name(0, None) in profiled.weights


def test_histogram_quantile_matches_exact_quantile():
    gen = torch.Generator().manual_seed(0)
    hist = AbsHistogram()
    chunks = [torch.randn(1000, 64, generator=gen) * torch.rand(1, 64, generator=gen) for _ in range(8)]
    chunks.append(torch.zeros(500, 64))                  # exact zeros count as inactive
    for c in chunks:
        hist.add(c)
    everything = torch.cat(chunks).abs().flatten()
    for q in (0.2, 0.5, 0.9, 0.99):
        t = hist.quantile(q)
        assert abs(float((everything <= t).float().mean()) - q) < 0.002
    assert hist.quantile(0.05) == 0.0                    # the zeros alone reach 5%


def test_config_needs_exactly_one_of_value_or_target():
    for bad in [{}, {"value": 0.1, "target_sparsity": 0.5}, {"target_sparsity": 1.0}, {"value": -1}]:
        with pytest.raises(ValidationError):
            ThresholdConfig(**bad)


def test_calibration_without_data_is_a_user_error():
    ctx = Context(spec=SimpleNamespace(data=None), build_dir=Path("."), work_dir=Path("."))
    with pytest.raises(UserError, match="needs data.calib"):
        PASS.run(make_tiny_ir(), ThresholdConfig(target_sparsity=0.5), ctx)


def test_a_given_value_needs_no_data_and_no_data_in_its_key(tmp_path, capsys):
    from tscompile.cli import main
    from tscompile.engine import plan_build
    from tscompile.ir import ModelIR
    from tscompile.spec import parse_spec
    text = ("version: 1\nname: t\nsource: {tiny: {layers: 1, hidden: 32, intermediate: 64, heads: 2, kv_heads: 1}}\n"
            "pipeline:\n  - drelu: {}\n  - threshold: {value: 0.01}\n")
    (tmp_path / "s.yaml").write_text(text)
    for args in (["--dry-run"], ["--no-verify"]):
        with pytest.raises(SystemExit) as e:
            main(["build", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "b"), *args])
        assert e.value.code == 0, capsys.readouterr().err
    model = ModelIR.load(tmp_path / "b" / "model")
    assert [ann.threshold for _, _, ann in model.ffn_units()] == [0.01]
    (tmp_path / "c.txt").write_text("calibration text")
    with_data = parse_spec(text + f"data: {{calib: {{path: {tmp_path / 'c.txt'}}}}}\n", "s.yaml")
    assert plan_build(with_data, tmp_path / "b").steps[1].cached      # the data is not an input of this step
