"""evaluate_text: perplexity over windows and FFN activation sparsity, checked against direct computation;
and SmolLM2's perplexity on the Python tutorial (the sanity figure of a correct import)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tscompile.errors import UserError
from tscompile.evaluate import evaluate_text
from tscompile.reference import ReferenceModel
from tscompile.tiny import add_random_predictors, make_tiny_ir

TEXT = ("The quick brown fox jumps over the lazy dog. Sparse models compute only the neurons that fire. "
        "Once upon a time, a small model learned to speak. Numbers: 3.14159, 2.71828.\n") * 3
TUTORIAL = Path("/usr/share/doc/python3.11/html/_sources/tutorial")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return p


def direct(ir, ids, seq_len, gating="exact"):
    """Perplexity and per-layer zero fraction of h, computed window by window without evaluate_text."""
    m = ReferenceModel.from_ir(ir)
    caps = []
    for f in m.ffns():
        f.capture = []
        caps.append(f.capture)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            if w.shape[1] < 2:
                continue
            logp = m(w, gating=gating)[0, :-1].log_softmax(-1)
            nll -= logp.gather(1, w[0, 1:, None]).sum().item()
            n += w.shape[1] - 1
    zeros = [sum(int((h == 0).sum()) for _, h in c) / sum(h.numel() for _, h in c) for c in caps]
    return math.exp(nll / n), zeros


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_matches_direct_computation(text_file, activation):
    ir = make_tiny_ir("llama", activation=activation, seed=3)
    for _, _, ann in ir.ffn_units():
        ann.threshold = 0.05 if activation == "relu" else 0.0
    ids = Tokenizer.from_str(ir.tokenizer_json).encode(TEXT).ids
    r = evaluate_text(ir, str(text_file), tokens=150, seq_len=40)
    ppl, zeros = direct(ir, ids[:150], 40)
    assert r["tokens"] == 150
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert r["layer_sparsity"] == pytest.approx(zeros)
    assert r["sparsity"] == pytest.approx(sum(zeros) / len(zeros))
    if activation == "relu":
        assert 0.4 < r["sparsity"] < 1.0
    else:
        assert r["sparsity"] == 0.0         # silu(g)*u is never exactly zero


def test_all_tokens_and_short_last_window(text_file):
    ir = make_tiny_ir("qwen2", seed=1)
    n = len(Tokenizer.from_str(ir.tokenizer_json).encode(TEXT).ids)
    r = evaluate_text(ir, str(text_file), seq_len=n - 1)          # windows of n-1 and 1 (the 1 is skipped)
    assert r["tokens"] == n - 1                                   # the tokens read, not those of the text
    assert r["perplexity"] == pytest.approx(direct(ir, Tokenizer.from_str(ir.tokenizer_json).encode(TEXT).ids,
                                                   n - 1)[0], rel=1e-5)


def test_predictor_gating_adds_sparsity(text_file):
    ir = add_random_predictors(make_tiny_ir("mistral", activation="relu", seed=2), rank=8, threshold=0.3)
    exact = evaluate_text(ir, str(text_file), tokens=100, seq_len=50, gating="exact")
    gated = evaluate_text(ir, str(text_file), tokens=100, seq_len=50, gating="predictor")
    assert gated["sparsity"] > exact["sparsity"] + 0.05
    assert gated["layer_sparsity"] == pytest.approx(direct(ir, Tokenizer.from_str(ir.tokenizer_json)
                                                           .encode(TEXT).ids[:100], 50, "predictor")[1])


def test_moe_layers_count_routed_tokens(text_file):
    ir = make_tiny_ir("mixtral", activation="relu", experts=4, top_k=2, seed=0)
    r = evaluate_text(ir, str(text_file), tokens=80, seq_len=40)
    ids = Tokenizer.from_str(ir.tokenizer_json).encode(TEXT).ids[:80]
    m = ReferenceModel.from_ir(ir)
    caps = [[] for _ in m.ffns()]
    for f, c in zip(m.ffns(), caps):
        f.capture = c
    with torch.no_grad():
        for i in (0, 40):
            m(torch.tensor([ids[i:i + 40]]))
    for layer in range(2):
        hs = [h for c in caps[layer * 4:(layer + 1) * 4] for _, h in c]
        assert sum(h.shape[-2] for h in hs) == 80 * 2                      # every token reaches top_k experts
        assert r["layer_sparsity"][layer] == pytest.approx(sum(int((h == 0).sum()) for h in hs)
                                                           / sum(h.numel() for h in hs))


def test_directory_documents_are_joined_with_end_of_text(tmp_path):
    ir = make_tiny_ir("llama")
    tok = Tokenizer.from_str(ir.tokenizer_json)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello world")
    (tmp_path / "d" / "b.txt").write_text("sparse fox")
    r = evaluate_text(ir, str(tmp_path / "d"), seq_len=64)
    assert r["tokens"] == len(tok.encode("hello world").ids) + 1 + len(tok.encode("sparse fox").ids)


def test_bad_inputs(tmp_path, text_file):
    ir = make_tiny_ir("llama")
    with pytest.raises(UserError, match="gating 'fast'"):
        evaluate_text(ir, str(text_file), gating="fast")
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        evaluate_text(ir, str(tmp_path / "one.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserError, match="not UTF-8"):
        evaluate_text(ir, str(tmp_path / "bin.txt"))
    with pytest.raises(UserError, match="no such file"):
        evaluate_text(ir, str(tmp_path / "missing.txt"))
    (tmp_path / "long.txt").write_text("the lazy dog " * 400)
    with pytest.raises(UserError, match="seq_len 1024 is longer than the model's context .max_position_embeddings "
                                        "512.$"):
        evaluate_text(ir, str(tmp_path / "long.txt"), seq_len=1024)
    ir.tokenizer_json = None
    with pytest.raises(UserError, match="tokenizer"):
        evaluate_text(ir, str(text_file))


def test_smollm2_tutorial_perplexity(smollm2_ir):
    assert TUTORIAL.is_dir(), "install Debian python3.11-doc (the Python tutorial is the evaluation text)"
    r = evaluate_text(smollm2_ir, str(TUTORIAL), tokens=4096, seq_len=1024)
    assert r["tokens"] == 4096
    assert 12 < r["perplexity"] < 18          # measured 15.4; a wrong rope un-permutation gives hundreds
    assert len(r["layer_sparsity"]) == 30 and r["sparsity"] < 0.01   # SwiGLU: almost no exact zeros
