"""The reference decoder against transformers (the published implementations), and its own invariants:
KV-cache decode equals full recompute, left padding equals unpadded, FFN semantics of every annotation."""
from __future__ import annotations

import pytest
import torch

from tscompile.reference import KVCache, ReferenceModel, activate
from tscompile.tiny import add_random_predictors, make_tiny_ir

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "mixtral": "MixtralForCausalLM"}


def hf_logits(ir, ckpt_dir, ids):
    transformers = pytest.importorskip("transformers")
    ir.save(ckpt_dir)
    cls = getattr(transformers, HF_CLASSES[ir.config.family])
    model = cls.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family,kw", [
    ("llama", {}),
    ("mistral", {"sliding_window": 5}),            # window shorter than the 12-token sequence
    ("qwen2", {}),                                  # q/k/v bias, tied embeddings
    ("mixtral", {"experts": 4, "top_k": 2}),
])
def test_logits_equal_transformers(tmp_path, family, kw):
    ir = make_tiny_ir(family, seed=3, **kw)
    ids = torch.randint(3, ir.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want = hf_logits(ir, tmp_path / "ckpt", ids)
    got = ReferenceModel.from_ir(ir)(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_equals_transformers(tmp_path, scaling):
    ir = make_tiny_ir("llama", seed=9)
    ir.config.rope_theta = 500000.0
    ir.config.rope_scaling = scaling
    ids = torch.arange(3, 43)[None] * 7 % ir.config.vocab_size
    want = hf_logits(ir, tmp_path / "ckpt", ids)
    got = ReferenceModel.from_ir(ir)(ids)
    assert (got - want).abs().max().item() <= 1e-4
    plain = make_tiny_ir("llama", seed=9)
    plain.config.rope_theta = 500000.0
    assert (ReferenceModel.from_ir(plain)(ids) - got).abs().max() > 1e-3   # the scaling matters here


@pytest.mark.parametrize("family,kw,edit", [
    ("llama", {}, {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 8}}),
    ("mixtral", {"experts": 4, "top_k": 2}, {"rope_theta": 1e6}),
    ("qwen2", {"sliding_window": 5}, {}),
])
def test_a_checkpoint_saved_by_transformers_loads_equal(tmp_path, family, kw, edit):
    """transformers >= 5 writes rope_parameters (not rope_theta / rope_scaling) and Qwen2's per-layer windows;
    its own save must load back to its logits (the old keys fell back to theta 10000, unscaled, in silence)."""
    transformers = pytest.importorskip("transformers")
    from tscompile.checkpoint import load_checkpoint
    ir = make_tiny_ir(family, seed=4, **kw)
    for k, v in edit.items():
        setattr(ir.config, k, v)
    ir.save(tmp_path / "ours")
    model = getattr(transformers, HF_CLASSES[family]).from_pretrained(
        tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "theirs")
    ids = torch.arange(3, 15)[None] * 5 % ir.config.vocab_size
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    got = ReferenceModel.from_ir(load_checkpoint(tmp_path / "theirs"))(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_config_defaults_are_transformers_defaults():
    """Keys a config.json leaves out take transformers' defaults for the family."""
    transformers = pytest.importorskip("transformers")
    from tscompile.ir import ArchConfig
    for family, cls in (("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"),
                        ("mixtral", "MixtralConfig")):
        theirs = getattr(transformers, cls)()
        ours = ArchConfig.from_hf({"model_type": family, "vocab_size": 64, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
        assert ours.rms_norm_eps == theirs.rms_norm_eps, family
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"], family
        windowed = getattr(theirs, "use_sliding_window", True)
        assert ours.sliding_window == (getattr(theirs, "sliding_window", None) if windowed else None), family


def test_sliding_window_changes_the_function():
    # guards the test above: with a window shorter than the sequence, later logits must differ
    ids = torch.arange(3, 15)[None]
    full = ReferenceModel.from_ir(make_tiny_ir("mistral", seed=3))(ids)
    windowed = ReferenceModel.from_ir(make_tiny_ir("mistral", seed=3, sliding_window=5))(ids)
    assert torch.equal(full[:, :5], windowed[:, :5])
    assert (full[:, 6:] - windowed[:, 6:]).abs().max() > 1e-3


def test_smollm2_logits_equal_transformers(smollm2_ir, tmp_path):
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 8591, 314]])
    want = hf_logits(smollm2_ir, tmp_path / "ckpt", ids)
    got = ReferenceModel.from_ir(smollm2_ir)(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert int(got[0, 4].argmax()) == int(want[0, 4].argmax())


@pytest.mark.parametrize("family,kw", [("llama", {}), ("mistral", {"sliding_window": 4}), ("qwen2", {}),
                                       ("mixtral", {"experts": 4, "top_k": 2})])
def test_prefill_then_decode_equals_full_recompute(family, kw):
    ir = add_random_predictors(make_tiny_ir(family, activation="relu", seed=5, **kw), threshold=-0.5)
    for ann in (a for _, _, a in ir.ffn_units()):
        ann.mode = "exact"   # predictor gating would (rightly) make decode differ from a dense prefill
    m = ReferenceModel.from_ir(ir)
    ids = torch.randint(3, ir.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    full = m(ids)
    cache = KVCache.empty(ir.config.num_layers)
    steps = [m(ids[:, :6], cache=cache)]
    for t in range(6, 10):
        steps.append(m(ids[:, t:t + 1], cache=cache))
    assert cache.length == 10
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_left_padded_batch_equals_single_sequences(family):
    ir = make_tiny_ir(family, seed=7, **({"experts": 4} if family == "mixtral" else {}))
    m = ReferenceModel.from_ir(ir)
    seqs = [[5, 9, 40, 77, 13, 8, 100], [21, 30, 4]]
    T = max(map(len, seqs))
    ids = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    cache = KVCache.empty(ir.config.num_layers)
    batch = m(ids, attention_mask=mask, cache=cache)
    nxt = torch.tensor([[11], [12]])
    step = m(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), cache=cache)
    for b, s in enumerate(seqs):
        single = m(torch.tensor([s + [int(nxt[b])]]))
        assert (batch[b, T - len(s):] - single[0, :-1]).abs().max().item() <= 1e-5
        assert (step[b, 0] - single[0, -1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "relu", "drelu"])
def test_ffn_follows_the_documented_formula(kind):
    ir = make_tiny_ir("llama", activation=kind, seed=2)
    ir = add_random_predictors(ir, threshold=0.1)
    ffn = ReferenceModel.from_ir(ir).ffns()[0]
    ffn.ann.threshold = 0.05
    x = torch.randn(1, 3, ir.config.hidden_size, generator=torch.Generator().manual_seed(0))
    g, u = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    acts = {"swiglu": torch.nn.functional.silu(g) * u,
            "geglu": torch.nn.functional.gelu(g, approximate="tanh") * u,
            "relu": g.clamp(min=0) * u, "drelu": g.clamp(min=0) * u.clamp(min=0)}
    h = acts[kind]
    assert torch.equal(activate(kind, g, u), h)
    h = torch.where(h.abs() > 0.05, h, torch.zeros_like(h))
    logit = torch.relu(x @ ffn.predictor.fc1.weight.T) @ ffn.predictor.fc2.weight.T
    gated = torch.where(logit >= 0.1, h, torch.zeros_like(h))
    with torch.no_grad():
        assert torch.allclose(ffn(x, gating="exact"), h @ ffn.down_proj.weight.T, atol=1e-6)
        assert torch.allclose(ffn(x, gating="predictor"), gated @ ffn.down_proj.weight.T, atol=1e-6)
        # "auto" gates single-token forwards (decode) only
        assert torch.allclose(ffn(x, gating="auto"), h @ ffn.down_proj.weight.T, atol=1e-6)
        assert torch.allclose(ffn(x[:, :1], gating="auto"), gated[:, :1] @ ffn.down_proj.weight.T, atol=1e-6)
    assert 0 < int((gated == 0).sum()) - int((h == 0).sum())   # the predictor removed some neurons


def test_sample_top_p_keeps_the_smallest_head_over_p():
    from tscompile.reference import sample
    logits = torch.tensor([3.0, 2.0, 0.0, -5.0])   # softmax ~ 0.705, 0.259, 0.035, 0.0002
    gen = torch.Generator().manual_seed(0)

    def drawn(temperature, top_p):
        return {sample(logits, temperature, top_p, gen) for _ in range(300)}
    assert drawn(1.0, 0.5) == {0}
    assert drawn(1.0, 0.9) == {0, 1}
    assert {0, 1, 2} <= drawn(1.0, 1.0)
    assert drawn(0.0, 1.0) == {0}                 # temperature 0: greedy


def test_generate_with_a_seed_repeats():
    m = ReferenceModel.from_ir(make_tiny_ir("llama", seed=3))
    runs = [m.generate([1, 2, 3], 12, temperature=0.9, top_p=0.95, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_generate_stops_at_any_of_several_eos_ids():   # Llama-3 instruct ends a turn with 128009, not 128001
    ir = make_tiny_ir("llama", seed=3)
    free = ReferenceModel.from_ir(ir).generate([1, 2, 3], 8, stop_at_eos=False)
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    ir.config.eos_token_id = [next(t for t in range(ir.config.vocab_size) if t not in free), stop]
    assert ReferenceModel.from_ir(ir).generate([1, 2, 3], 8) == free[:free.index(stop) + 1]
