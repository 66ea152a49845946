"""The decoder on the GPU. Same function as tscompile/reference.py.

A decode step (one token) runs on the generated kernels: per layer a GEMV for q/k/v with the input RMSNorm folded
in, one attention kernel (rope, KV-cache write, split-KV attention), a GEMV for o_proj + residual, then the FFN
with the post-attention RMSNorm folded in: predictor + sparse_ffn (mode predictor; the predictor's first layer
rides on the o_proj GEMV, see fold_predictor); exact gating with
sparse_ffn_exact, after a GEMV of the gate that picks its rows for relu and drelu; or, where no h is ever zero and
for the dense baseline, a GEMV for act(gate) * up and cuBLAS for down + residual. The LM head is a GEMV with the
final norm. Prompts (several tokens) run in PyTorch with the dense exact FFN.

The KV cache has a fixed capacity and every tensor a decode step touches is allocated once, so the step
(one token in at `pos`, logits and the greedy next token out) can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tscompile.ir import RELU_KINDS, ArchConfig
from tscompile.reference import activate, rope_inv_freq

from .library import KernelLibrary, Workspace, default_grid
from .moe import moe_layers


@dataclass
class FFNSpec:
    """What the runtime needs of one FFN's annotation."""
    activation: str
    threshold: float
    mode: str = "exact"          # "predictor": its predictor picks the neurons at decode; "dense": every neuron, on
                                 # the dense kernels (no sparsity worth skipping); "exact": the rows h can be non-zero
    predictor_threshold: float = 0.0
    predictor_relu: bool = True
    experts: list | None = None  # an MoE layer: one FFNSpec (or its dict) per expert; the other fields are unused

    def __post_init__(self):
        if self.mode not in ("exact", "predictor", "dense"):
            raise ValueError(f"FFNSpec.mode {self.mode!r}: expected exact, predictor or dense")
        if self.experts is not None:
            self.experts = [e if isinstance(e, FFNSpec) else FFNSpec(**e) for e in self.experts]

    @property
    def gated(self) -> bool:
        return self.mode == "predictor"

    @property
    def dense(self) -> bool:
        return self.mode == "dense"


def fold_predictor(fc1, post_norm, w_o) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's first layer as extra rows of a decode step's o_proj GEMV (a load-time rewrite), which saves it
    a kernel of its own. fc1 rmsnorm(x) = fc1 (w_post x) / rms(x), and x = x_in + W_o att (x_in: the layer's input,
    att: the heads' outputs), so fc1 (w_post x) = (F W_o) att + F x_in with F = fc1 diag(w_post): o_proj's GEMV
    computes both dots of each rank row beside its own rows; predict_active divides by rms(x).
    Returns (F W_o [rank, heads * head_dim], F [rank, hidden])."""
    f = fc1.float() * post_norm.float()
    return (f @ w_o.float()).to(fc1.dtype), f.to(fc1.dtype)


def layer_weight_names(i: int) -> dict[str, str]:
    """Names of layer i's tensors in weights.safetensors (shapes in backends/cuda/lower.py)."""
    p = f"layers.{i}."
    return {k: p + k for k in ("input_norm", "post_norm", "qkv", "qkv_bias", "o", "gate", "up", "down_t",
                               "fc1", "fc2")}


class GPUDecoder:
    """Weights on the GPU, a fixed-capacity KV cache, and forward(tokens, positions) for T >= 1 tokens.
    lib None: everything in PyTorch (CPU checks of this code). dense: the baseline, every FFN dense."""

    def __init__(self, cfg: ArchConfig, ffns: list[FFNSpec], weights: dict[str, torch.Tensor],
                 lib: KernelLibrary | None, dtype: torch.dtype, dense: bool = False):
        self.cfg, self.ffns, self.lib, self.dtype, self.dense = cfg, ffns, lib, dtype, dense
        self.w = weights
        self.folded: dict[int, tuple] = {}   # layer -> its predictor's first layer as o_proj rows (fold_predictor)
        self.dev = weights["embed"].device
        self.head = weights["embed"] if cfg.tie_word_embeddings else weights["lm_head"]
        if cfg.is_moe:   # every FFN is a mixture of experts (backends/cuda/moe.py)
            self.moe = moe_layers(self)
        elif dense:   # cuBLAS computes down + residual from the HF layout [hidden, inter]
            for i in range(cfg.num_layers):
                self.w[f"layers.{i}.down"] = self.w.pop(layer_weight_names(i)["down_t"]).T.contiguous()
        elif lib is not None:
            ranks = [weights[layer_weight_names(i)["fc1"]].shape[0] for i, f in enumerate(ffns) if f.gated]
            self.ws = Workspace(lib, max(ranks, default=8), 1, self.dev)
            self.grid = default_grid(self.dev)
            # the GEMV takes extra rows after whole blocks of 16 of its own, of the length of its input (att)
            if cfg.hidden_size % 16 == 0 and cfg.num_heads * cfg.head_dim == cfg.hidden_size:
                for i, f in enumerate(ffns):
                    n = layer_weight_names(i)
                    if f.gated:
                        self.folded[i] = fold_predictor(weights[n["fc1"]], weights[n["post_norm"]], weights[n["o"]])
        self.inv_freq = rope_inv_freq(cfg).to(self.dev)
        self.capacity = 0
        self.capture: list | None = None   # when a list: receives (layer, FFN input) of every forward

    def reset(self, capacity: int) -> None:
        """An empty KV cache for `capacity` positions (k, v: [layers, kv_heads, capacity, head_dim])."""
        c = self.cfg
        shape = (c.num_layers, c.num_kv_heads, capacity, c.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.dev)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.dev)
        pos = torch.arange(capacity, dtype=torch.float64, device=self.dev)
        ang = pos[:, None] * self.inv_freq.double()[None]
        self.cos = torch.cat([ang, ang], dim=-1).cos().float()          # [capacity, head_dim], HF rotate-half layout
        self.sin = torch.cat([-ang, ang], dim=-1).sin().float()         # signed: rope's [-x2, x1] = roll(x) * sign
        self.capacity = capacity

    def _norm(self, x, w):
        """RMSNorm, one fused kernel: float32 inside, one rounding to the model dtype at the end (as the reference;
        the weights are already in the model dtype)."""
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)

    def _rope(self, x, cos, sin):
        """HF rotate-half rope, x * cos + [-x2, x1] * sin, computed in float32 (cos and sin are float32), rounded once
        into the model dtype. sin carries the sign, so [-x2, x1] * sin is roll(x) * sin: three kernels."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin, out=torch.empty_like(x))

    def _attention(self, i: int, x, pos, cos, sin, mask):
        """x [T, H] at positions pos [T]; writes k, v into the cache, attends over it (float32 softmax); returns the
        heads' outputs [T, heads * head_dim] (o_proj is applied with the residual add).
        mask [rep * T, capacity]: 0 where a query row may see a cached position, -inf where not."""
        c, n = self.cfg, layer_weight_names(i)
        T, hd, nh, nkv = x.shape[0], c.head_dim, c.num_heads, c.num_kv_heads
        qkv = F.linear(x, self.w[n["qkv"]], self.w.get(n["qkv_bias"]))
        qk = self._rope(qkv[:, :(nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)   # rope on q and k at once
        q, k = qk[:, :nh].transpose(0, 1), qk[:, nh:].transpose(0, 1)             # [heads, T, hd]
        self.k[i].index_copy_(1, pos, k)
        self.v[i].index_copy_(1, pos, qkv[:, (nh + nkv) * hd:].view(T, nkv, hd).transpose(0, 1))
        rep = nh // nkv   # the query heads of one kv head attend as one batch row: [kv_heads, rep * T, hd]
        out = F.scaled_dot_product_attention(q.reshape(1, nkv, rep * T, hd), self.k[i][None], self.v[i][None],
                                             attn_mask=mask)
        return out.view(nh, T, hd).transpose(0, 1).reshape(T, nh * hd)

    def _ffn_dense(self, i: int, x):
        if self.cfg.is_moe:
            return self.moe[i].dense(x)
        f, w, n = self.ffns[i], self.w, layer_weight_names(i)
        h = activate(f.activation, F.linear(x, w[n["gate"]]), F.linear(x, w[n["up"]]))
        if f.threshold > 0:
            h = h * (h.abs() > f.threshold)
        return F.linear(h, w[f"layers.{i}.down"]) if self.dense else h @ w[n["down_t"]]

    def _ffn_into(self, i: int, x) -> torch.Tensor:
        """x + FFN(rmsnorm(x)) for one token x [1, hidden] through the kernels; the sparse path updates x in place."""
        f, n, lib, eps = self.ffns[i], layer_weight_names(i), self.lib, self.cfg.rms_norm_eps
        norm = self.w[n["post_norm"]]
        if self.cfg.is_moe:
            return self.moe[i].decode_into(self._norm(x, norm), x)
        if self.dense:
            return self._ffn_gemv(i, x, self.w[f"layers.{i}.down"].T)
        ws, gate, up, down_t = self.ws, self.w[n["gate"]], self.w[n["up"]], self.w[n["down_t"]]
        if f.gated:
            lib.predict(x, self.w[n["fc1"]], self.w[n["fc2"]], f.predictor_relu, f.predictor_threshold, ws,
                        norm=norm, eps=eps)
            return self._sparse_ffn(i, x, x)
        if f.dense or f.threshold == 0 and f.activation in ("swiglu", "geglu"):   # no h is zero: dense kernels
            return self._ffn_gemv(i, x, down_t)
        g = None
        if f.activation in RELU_KINDS:   # act is exactly zero where g <= 0: the gate GEMV picks the rows
            g = ws.gate
            lib.gemv(x, gate, g[0], norm=norm, eps=eps, positive=g[1])
        lib.sparse_ffn_exact(x, gate, up, down_t, f.activation, f.threshold, g, ws, x, self.grid, residual=x,
                             norm=norm, eps=eps)
        return x

    def _sparse_ffn(self, i: int, x, out) -> torch.Tensor:
        """out = x + FFN(rmsnorm(x)) over the neurons the predictor listed in ws.active (out may be x)."""
        f, n, ws = self.ffns[i], layer_weight_names(i), self.ws
        self.lib.sparse_ffn(x, self.w[n["gate"]], self.w[n["up"]], self.w[n["down_t"]], f.activation, f.threshold,
                            ws.active, ws.active_count, None, ws, out, self.grid, residual=x,
                            norm=self.w[n["post_norm"]], eps=self.cfg.rms_norm_eps)
        return out

    def _ffn_gemv(self, i: int, x, down_t) -> torch.Tensor:
        """x + FFN(rmsnorm(x)) on the dense kernels: a GEMV for act(gate) * up with the norm folded in, then cuBLAS
        for h @ down_t + x (down_t [inter, hidden], a transposed view of the HF layout or the sparse layout)."""
        f, n = self.ffns[i], layer_weight_names(i)
        h = torch.empty(1, self.cfg.intermediate_size, dtype=self.dtype, device=self.dev)
        self.lib.gemv(x, self.w[n["gate"]], h, norm=self.w[n["post_norm"]], eps=self.cfg.rms_norm_eps,
                      up=self.w[n["up"]], activation=f.activation, threshold=f.threshold)
        return torch.addmm(x, h, down_t)

    def _capture(self, i: int, x) -> None:
        if self.capture is not None:
            self.capture.append((i, self._norm(x, self.w[layer_weight_names(i)["post_norm"]])))

    def _decode(self, token, pos):
        """One token [1] at pos [1] through the generated kernels -> float32 logits [1, vocab]."""
        c, lib, w = self.cfg, self.lib, self.w
        x = w["embed"][token]                                                   # [1, hidden] residual stream
        qkv = torch.empty((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, dtype=self.dtype, device=self.dev)
        att = torch.empty(c.num_heads * c.head_dim, dtype=self.dtype, device=self.dev)
        mid = torch.empty_like(x)   # o_proj's output where the predictor's rows read x (the layer's input) meanwhile
        for i in range(c.num_layers):
            n = layer_weight_names(i)
            lib.gemv(x, w[n["qkv"]], qkv, norm=w[n["input_norm"]], eps=c.rms_norm_eps, bias=w.get(n["qkv_bias"]))
            lib.decode_attention(qkv, pos, self.cos, self.sin, self.k[i], self.v[i], c.sliding_window or 0, att)
            if i in self.folded:   # mid = x + o_proj(att); ws.z = fc1 (w_post mid); the active count reset
                f, ws = self.ffns[i], self.ws
                lib.gemv(att, w[n["o"]], mid, residual=x, extra=(*self.folded[i], x, ws.z), zero=ws.active_count)
                self._capture(i, mid)
                lib.predict_folded(mid, w[n["fc2"]], f.predictor_relu, f.predictor_threshold, ws, c.rms_norm_eps)
                x = self._sparse_ffn(i, mid, x)
                continue
            lib.gemv(att, w[n["o"]], x, residual=x)                            # x += o_proj(att), in place
            self._capture(i, x)
            x = self._ffn_into(i, x)
        logits = torch.empty(1, c.vocab_size, dtype=torch.float32, device=self.dev)
        lib.gemv(x, self.head, logits, norm=w["norm"], eps=c.rms_norm_eps)
        return logits

    def forward(self, tokens, pos):
        """tokens, pos [T] (device, int64) -> float32 logits [T, vocab]. T == 1 runs on the generated kernels."""
        if self.lib is not None and tokens.shape[0] == 1:
            return self._decode(tokens, pos)
        c = self.cfg
        kpos = torch.arange(self.capacity, device=self.dev)
        mask = kpos[None, :] <= pos[:, None]                                   # causal (positions = order)
        if c.sliding_window:
            mask &= (pos[:, None] - kpos[None, :]) < c.sliding_window
        rows = mask.repeat(c.num_heads // c.num_kv_heads, 1)                 # rows: (head in group, token)
        mask = torch.zeros(rows.shape, dtype=self.dtype, device=self.dev).masked_fill_(~rows, float("-inf"))
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]             # [T, 1, head_dim]
        x = self.w["embed"][tokens]
        for i in range(c.num_layers):
            n = layer_weight_names(i)
            att = self._attention(i, self._norm(x, self.w[n["input_norm"]]), pos, cos, sin, mask)
            x = torch.addmm(x, att, self.w[n["o"]].T)                           # x + o_proj(att), one GEMM
            hn = self._norm(x, self.w[n["post_norm"]])
            if self.capture is not None:
                self.capture.append((i, hn))
            x = x + self._ffn_dense(i, hn)
        return F.linear(self._norm(x, self.w["norm"]), self.head).float()
