"""describe(): parameter counts, decode bytes and annotations, checked against sums computed here."""
from __future__ import annotations

import json

import pytest

from tscompile.inspect import describe, format_description
from tscompile.ir import ModelIR
from tscompile.tiny import add_random_predictors, make_tiny_ir


def numel(ir, pred):
    return sum(ir.weights[n].numel() for n in ir.weights if pred(n))


def test_dense_llama_counts_and_decode_bytes():
    ir = make_tiny_ir("llama", layers=3, hidden=64, intermediate=192, vocab=400)
    d = describe(ir)
    p = d["params"]
    assert p["total"] == numel(ir, lambda n: True)
    assert p["embedding"] == p["lm_head"] == 400 * 64
    assert p["attention"] == 3 * (64 * 64 * 2 + 64 * 32 * 2)          # q, o [64, 64]; k, v [32, 64]
    assert p["ffn"] == 3 * 3 * 64 * 192 and p["norm"] == (2 * 3 + 1) * 64 and p["predictor"] == 0
    b = d["decode_bytes_per_token"]
    assert b["embedding"] == 64 * 4 and b["lm_head"] == 400 * 64 * 4   # one embedding row; the whole head
    assert b["total"] == 4 * (p["total"] - p["embedding"]) + 64 * 4
    assert d["ffn_share_of_decode_bytes"] == pytest.approx(4 * p["ffn"] / b["total"])
    assert d["kv_cache_bytes_per_token"] == 2 * 3 * 2 * 16 * 4
    assert "sparse_decode_estimate" not in d
    json.dumps(d)


def test_tied_embeddings_read_once_for_the_head():
    ir = make_tiny_ir("qwen2")      # tied, with q/k/v biases
    d = describe(ir)
    assert d["params"]["lm_head"] == 0 and d["config"]["tie_word_embeddings"]
    assert d["decode_bytes_per_token"]["lm_head"] == d["bytes"]["embedding"]
    assert d["params"]["attention"] == numel(ir, lambda n: ".self_attn." in n)


def test_moe_reads_top_k_experts_and_router():
    ir = make_tiny_ir("mixtral", experts=4, top_k=2)
    d = describe(ir)
    router = numel(ir, lambda n: n.endswith("block_sparse_moe.gate.weight")) * 4
    experts = numel(ir, lambda n: ".experts." in n) * 4
    assert d["bytes"]["ffn"] == router + experts
    assert d["decode_bytes_per_token"]["ffn"] == router + experts * 2 / 4
    assert len(d["layers"][0]["ffns"]) == 4


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_annotations_predictor_bytes_and_sparse_estimate(family):
    kw = {"experts": 4} if family == "mixtral" else {}
    ir = add_random_predictors(make_tiny_ir(family, activation="relu", **kw), rank=8)
    for _, _, ann in ir.ffn_units():
        ann.stats = {"sparsity": 0.9}
        ann.threshold = 0.02
    first = ir.layers[0].ffns()[0]
    first.mode = "exact"
    d = describe(ir)
    unit = d["layers"][0]["ffns"][0]
    assert unit["mode"] == "exact" and unit["threshold"] == 0.02 and unit["stats"] == {"sparsity": 0.9}
    assert unit["predictor"] == {"rank": 8, "threshold": 0.0, "relu": True, "bytes": 8 * (64 + 192) * 4}
    assert d["params"]["predictor"] == numel(ir, lambda n: ".predictor." in n)
    m = 64 * 192 * 4                                          # one FFN matrix, fp32
    n_units = len(list(ir.ffn_units()))
    # the "exact" unit reads its gate and (its gate's zero share not measured) up densely, down where h != 0;
    # predictor units read 10% of rows plus the predictor
    unit_bytes = [2 * m + 0.1 * m] + [0.1 * 3 * m + 8 * (64 + 192) * 4] * (n_units - 1)
    router = d["bytes"]["ffn"] - 3 * m * n_units
    assert router == (2 * 4 * 64 * 4 if family == "mixtral" else 0)
    want = router + (2 / 4 if family == "mixtral" else 1.0) * sum(unit_bytes)
    est, dec = d["sparse_decode_estimate"], d["decode_bytes_per_token"]
    assert est["ffn_bytes"] == pytest.approx(want)
    assert est["total_bytes"] == pytest.approx(dec["total"] - dec["ffn"] + want)
    text = format_description(d)
    assert "predictor" in text and " 0.900" in text and "less)" in text
    first.stats["gate_sparsity"] = 0.7                         # measured: up rows only where the gate is not 0
    est2 = describe(ir)["sparse_decode_estimate"]["ffn_bytes"]
    assert est2 == pytest.approx(want - (2 / 4 if family == "mixtral" else 1.0) * 0.7 * m)


def test_describe_reads_headers_only_and_matches(tmp_path):
    ir = add_random_predictors(make_tiny_ir("mistral", sliding_window=8), rank=4)
    ir.weights["model.layers.0.mlp.stats.frequency"] = ir.weights["model.norm.weight"].clone()
    ir.save(tmp_path / "m")
    loaded = ModelIR.load(tmp_path / "m")
    assert describe(loaded) == describe(ir)
    assert describe(loaded)["bytes"]["extra_tensors"] == 1


def test_smollm2(smollm2_ir):
    d = describe(smollm2_ir)
    p = d["params"]
    assert p["total"] == 134_515_008
    assert (p["embedding"], p["attention"], p["ffn"]) == (49152 * 576, 30 * (2 * 576 * 576 + 2 * 192 * 576),
                                                          30 * 3 * 576 * 1536)
    assert d["ffn_share_of_decode_bytes"] == pytest.approx(p["ffn"] / (p["total"] - p["embedding"] + 576
                                                                      + p["embedding"]), rel=1e-6)
    assert 0.58 < d["ffn_share_of_decode_bytes"] < 0.60
    text = format_description(d)
    assert "llama model" in text and "tied embeddings" in text and "59.2%" in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith(tuple("0123456789"))]) == 30


def test_passes_are_listed_by_name_and_version():
    ir = make_tiny_ir("llama")
    ir.meta["passes"] = [{"pass": "drelu", "version": 1, "config": {"lr": 0.1}},
                         {"pass": "predictors", "version": 2, "config": {}}]
    d = describe(ir)
    assert d["passes"] == ["drelu v1", "predictors v2"]
    assert "  passes applied: drelu v1, predictors v2\n" in format_description(d)


def test_loading_without_values_and_describe_never_read_tensor_data(tmp_path, monkeypatch):
    from tscompile.checkpoint import load_checkpoint
    from tscompile.ir import Weights
    ir = add_random_predictors(make_tiny_ir("mixtral", experts=4), rank=4)
    ir.save(tmp_path / "m")

    def no_data(self, name):
        raise AssertionError(f"read the data of {name}")
    monkeypatch.setattr(Weights, "__getitem__", no_data)
    assert describe(load_checkpoint(tmp_path / "m", check_values=False)) == describe(ir)
