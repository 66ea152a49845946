"""Tiny random models of the real architectures, generated deterministically (no download).

Golden tests and `specs/tiny*.yaml` use these: same code paths as a real model, seconds to run.
"""
from __future__ import annotations

import functools

from .ir import ArchConfig, FFNSparsity, LayerSparsity, ModelIR, Weights
from .checkpoint import expected_shapes

# A fixed text the tiny tokenizer's BPE merges are learned from (deterministic for a given tokenizers version;
# the tokenizer is stored with the model, so goldens never depend on retraining it).
_CORPUS = """The quick brown fox jumps over the lazy dog. Sparse models compute only the neurons that fire.
def forward(x):
    return relu(x @ w_gate) * relu(x @ w_up) @ w_down
Once upon a time, a small model learned to speak. It said: hello, world! 0123456789
In the beginning was the word, and the word was sparse. Numbers: 3.14159, 2.71828, 1.41421.
"""


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json(vocab_size: int = 384) -> str:
    """A byte-level BPE tokenizer (256 byte tokens + merges + <s>, </s>) as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_config(family: str = "mistral", layers: int = 2, hidden: int = 64, intermediate: int = 192,
                heads: int = 4, kv_heads: int = 2, vocab: int = 384, experts: int = 0, top_k: int = 2,
                sliding_window: int | None = None) -> ArchConfig:
    return ArchConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=family == "qwen2",
        sliding_window=sliding_window if family in ("mistral", "mixtral") else None,
        attention_bias=family == "qwen2", num_experts=experts if family == "mixtral" else 0,
        num_experts_per_tok=top_k if family == "mixtral" else 0, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2)


def make_tiny_ir(family: str = "mistral", activation: str = "swiglu", seed: int = 0, **kw) -> ModelIR:
    """A random model: linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms near 1."""
    import torch
    cfg = tiny_config(family, **kw)
    if cfg.is_moe:
        layers = [LayerSparsity(activation=activation,
                                experts=[FFNSparsity(activation=activation) for _ in range(cfg.num_experts)])
                  for _ in range(cfg.num_layers)]
    else:
        layers = [LayerSparsity(activation=activation) for _ in range(cfg.num_layers)]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(expected_shapes(cfg, layers).items()):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            # tied heads see the token's own embedding; a small scale keeps it from dominating the logits
            t = torch.randn(shape, generator=gen) * (0.25 if cfg.tie_word_embeddings else 1.0)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        tensors[name] = t.float()
    meta = {"source": f"tiny:{family}", "seed": seed}
    return ModelIR(cfg, Weights(tensors=tensors), tiny_tokenizer_json(cfg.vocab_size), layers, meta)


def add_random_predictors(ir: ModelIR, rank: int = 8, seed: int = 1, threshold: float = 0.0) -> ModelIR:
    """Give every FFN a random low-rank predictor (mode "predictor"): exercises gating without training."""
    import torch
    from .ir import Predictor, predictor_names
    out = ir.clone()
    gen = torch.Generator().manual_seed(seed)
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    for layer, expert, ann in out.ffn_units():
        fc1, fc2 = predictor_names(layer, expert)
        out.weights[fc1] = torch.randn(rank, H, generator=gen) / H ** 0.5
        out.weights[fc2] = torch.randn(I, rank, generator=gen) / rank ** 0.5
        ann.predictor, ann.mode = Predictor(rank=rank, threshold=threshold), "predictor"
    return out
