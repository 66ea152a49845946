"""The PyTorch reference decoder (llama / mistral / qwen2 / mixtral): the oracle for every pass and backend.

Module names equal HF's, so `state_dict()` is a checkpoint's weight table.

FFN semantics (docs/checkpoint-format.md), for an FFN annotated (activation, threshold t, mode, predictor):
    h = act(x Wg^T) * (x Wu^T)                 swiglu: silu(g)*u   geglu: gelu_tanh(g)*u
                                               relu: relu(g)*u     drelu: relu(g)*relu(u)
    h_j = 0 where |h_j| <= t                   (t = 0 leaves exact zeros as they are)
    predictor gating (mode "predictor"): h_j = 0 where fc2(relu(fc1 x))_j < predictor.threshold
    y = h Wd^T
Predictor gating applies to single-token forwards (decode) unless `gating` says otherwise; "exact" and
"dense" modes compute the same function as the formula without gating.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ir import ArchConfig, FFNSparsity, ModelIR, LayerSparsity

GATINGS = ("auto", "exact", "predictor")


def activate(kind: str, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if kind == "swiglu":
        return F.silu(g) * u
    if kind == "geglu":
        return F.gelu(g, approximate="tanh") * u
    if kind == "relu":
        return F.relu(g) * u
    if kind == "drelu":
        return F.relu(g) * F.relu(u)
    raise ValueError(f"unknown activation {kind!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope_inv_freq(cfg: ArchConfig) -> torch.Tensor:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (HF's rotate-half layout)."""
    ang = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device, torch.float64)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float()[:, None], ang.sin().float()[:, None]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Per layer: k, v [B, n_kv, S, head_dim]; key positions [B, S]."""
    k: list
    v: list
    pos: torch.Tensor | None = None

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(H, self.nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * hd, H, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, i: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache.k[i] is not None:
                k = torch.cat([cache.k[i], k], dim=2)
                v = torch.cat([cache.v[i], v], dim=2)
            cache.k[i], cache.v[i] = k, v
        # fused fp32 softmax(q k^T / sqrt(d)) v; enable_gqa shares each kv head with nh/nkv query heads.
        # (3-4x faster than materializing the [T, S] scores: eval of 1024-token windows is attention-bound)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None],
                                             enable_gqa=self.nh != self.nkv)
        out = torch.nan_to_num(out)   # fully masked rows (padding queries) attend to nothing
        out = out.to(x.dtype).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(out)


class Predictor(nn.Module):
    def __init__(self, hidden: int, inter: int, rank: int, relu: bool):
        super().__init__()
        self.fc1 = nn.Linear(hidden, rank, bias=False)
        self.fc2 = nn.Linear(rank, inter, bias=False)
        self.relu = relu

    def forward(self, x):
        z = self.fc1(x)
        return self.fc2(F.relu(z) if self.relu else z)


class FFN(nn.Module):
    """One gated FFN with its sparsity annotation. `capture` (a list) receives (input, h) when set."""

    def __init__(self, cfg: ArchConfig, ann: FFNSparsity, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.names = names
        for n, shape in zip(names, ((H, I), (H, I), (I, H))):
            setattr(self, n, nn.Linear(*shape, bias=False))
        self.ann = ann
        self.predictor = Predictor(H, I, ann.predictor.rank, ann.predictor.relu) if ann.predictor else None
        self.capture: list | None = None

    def forward(self, x, gating: str = "auto"):
        gate, up, down = (getattr(self, n) for n in self.names)
        h = activate(self.ann.activation, gate(x), up(x))
        if self.ann.threshold > 0:
            h = h * (h.abs() > self.ann.threshold)
        if self.predictor is not None and self.ann.mode == "predictor" and (
                gating == "predictor" or (gating == "auto" and x.shape[-2] == 1)):
            h = h * (self.predictor(x) >= self.ann.predictor.threshold)
        if self.capture is not None:
            self.capture.append((x, h))
        return down(h)


class MoE(nn.Module):
    """Mixtral sparse MoE block: softmax router, top-k experts, weights renormalized over the chosen k."""

    def __init__(self, cfg: ArchConfig, ann: LayerSparsity):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(FFN(cfg, a, ("w1", "w3", "w2")) for a in ann.experts)

    def forward(self, x, gating: str = "auto"):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs = self.gate(flat).float().softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                # tokens routed here form one "sequence"; decode (T == 1) keeps single-token semantics
                y = torch.cat([expert(flat[r].view(1, 1, H), gating) for r in rows]) if T == 1 else \
                    expert(flat[rows][None], gating)[0]
                out.index_add_(0, rows, y.view(-1, H) * w[rows, slot, None])
        return out.view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, ann: LayerSparsity):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            self.block_sparse_moe = MoE(cfg, ann)
        else:
            self.mlp = FFN(cfg, ann)

    def ffn(self):
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x, cos, sin, mask, cache, i, gating):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, i)
        return x + self.ffn()(self.post_attention_layernorm(x), gating)


class Backbone(nn.Module):
    def __init__(self, cfg: ArchConfig, layers: list[LayerSparsity]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, a) for a in layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ReferenceModel(nn.Module):
    def __init__(self, cfg: ArchConfig, layers: list[LayerSparsity]):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def from_ir(cls, ir: ModelIR, dtype=torch.float32, device="cpu") -> "ReferenceModel":
        with torch.device("meta"):
            m = cls(ir.config, ir.layers)
        # the checkpoint may hold more than the model uses (statistics such as activation frequencies)
        sd = {n: ir.weights[n].to(device=device, dtype=dtype) for n in m.state_dict() if n != "inv_freq"}
        m.load_state_dict(sd, assign=True, strict=False)
        m.inv_freq = rope_inv_freq(ir.config).to(device)
        return m.eval()

    def ffns(self) -> list[FFN]:
        """Every FFN module, in ModelIR.ffn_units() order."""
        out = []
        for layer in self.model.layers:
            f = layer.ffn()
            out.extend(f.experts if isinstance(f, MoE) else [f])
        return out

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache: KVCache | None = None,
                gating: str = "auto"):
        """input_ids [B, T] -> logits [B, T, vocab] (float32). attention_mask [B, past + T], 1 = real token.

        With `cache`, keys/values of this call are appended to it (prefill, then decode one token at a time).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.bool, device=dev)
        attention_mask = attention_mask.bool()
        if position_ids is None:
            # count real tokens before each one, so left padding does not shift positions
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        kpos = position_ids if cache is None or cache.pos is None else torch.cat([cache.pos, position_ids], 1)
        kvalid = attention_mask[:, -kpos.shape[1]:]
        if cache is not None:
            cache.pos = kpos
        qpos = position_ids
        order = torch.arange(kpos.shape[1], device=dev)   # causal by order in the sequence, not position
        mask = kvalid[:, None, :] & (order[None, None, :] <= order[-T:][None, :, None])
        if self.cfg.sliding_window:
            mask &= (qpos[:, :, None] - kpos[:, None, :]) < self.cfg.sliding_window
        cos, sin = rope_cos_sin(self.inv_freq, qpos)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, gating)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return (x @ head.T).float()

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> list[int]:
        """Prefill the prompt, then decode one token at a time. Temperature 0 = greedy."""
        dev = self.inv_freq.device
        gen = torch.Generator().manual_seed(seed)
        cache = KVCache.empty(self.cfg.num_layers)
        logits = self(torch.tensor([prompt_ids], device=dev), cache=cache)[0, -1]
        out = []
        for _ in range(max_new_tokens):
            tok = sample(logits.cpu(), temperature, top_p, gen)
            out.append(tok)
            if stop_at_eos and tok in self.cfg.eos_ids:
                break
            logits = self(torch.tensor([[tok]], device=dev), cache=cache)[0, -1]
        return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None = None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(-1) - p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
