"""Mixture-of-experts (Mixtral) layers on the cuda target: the generated MoE kernels (templates/moe.cu.j2, appended
to the FFN source of templates/ffn.cu.j2), their ctypes bindings and workspace, the layer weights, and the MoE
layer the GPU decoder calls.

weights.safetensors of an MoE layer i (the target dtype; see lower.py for the rest):
  layers.{i}.router [experts, H]
  layers.{i}.gate, up, down_t [experts * inter, H]   neuron j of expert e is row e * inter + j (down_t: down_proj^T)
  layers.{i}.fc1 [experts * rank, H], fc2 [experts * inter, rank]   predictors, every expert padded to the layer's
      largest rank (a multiple of 8) with zeros (same logits); all zero for an expert without a predictor

Decode (one token): route -> predictors of the routed experts -> one grouped sparse launch over the routed experts'
neurons, all reading the routing from device memory (CUDA-graph capturable). Prefill and the dense baseline route
in PyTorch like tscompile/reference.py; the dense baseline's decode step runs the routed experts through cuBLAS
batched GEMMs whose matrix pointers are computed on the GPU.
"""
from __future__ import annotations

import ctypes
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tscompile.errors import UserError
from tscompile.ir import ModelIR, ffn_names, predictor_names

from .kernels import ACTIVATION_ENUM, DTYPES, KernelShape, check_shape, ffn_launch, render_source

_P, _I = ctypes.c_void_p, ctypes.c_int
MAX_EXPERTS = 64   # moe_route keeps the chosen set in a 64-bit mask


@dataclass(frozen=True)
class MoEShape:
    """What the generated MoE source is specialized for."""
    name: str
    hidden: int
    inter: int                     # per expert
    experts: int
    top_k: int
    dtype: str
    activations: tuple[str, ...]   # kinds used by some MoE layer, each gets a moe_experts kernel
    max_rank: int = 0              # largest (padded) predictor rank of a layer, 0: no predictor
    heads: int = 0                 # attention shape of the decode-step kernels (kernels.KernelShape)
    kv_heads: int = 0
    head_dim: int = 0


def layer_rank(layer) -> int:
    """The rank every expert's predictor of this layer is padded to (0: no expert has one)."""
    return max((-(-a.predictor.rank // 8) * 8 for a in layer.experts if a.mode == "predictor" and a.predictor),
               default=0)


def moe_shape(ir: ModelIR, cfg) -> MoEShape:
    c = ir.config
    if c.num_experts > MAX_EXPERTS:
        raise UserError(f"targets.cuda: {c.num_experts} experts per layer; the MoE kernels support up to {MAX_EXPERTS}")
    for i, layer in enumerate(ir.layers):
        kinds = {a.activation for a in layer.experts}
        if len(kinds) > 1:
            raise UserError(f"targets.cuda: layer {i} mixes activations {sorted(kinds)} across its experts; the MoE "
                            "kernels need one activation per layer")
    return MoEShape(name=ir.display_name(), hidden=c.hidden_size, inter=c.intermediate_size, experts=c.num_experts,
                    top_k=c.num_experts_per_tok, dtype=cfg.dtype,
                    activations=tuple(sorted({layer.experts[0].activation for layer in ir.layers})),
                    max_rank=max(layer_rank(layer) for layer in ir.layers), heads=c.num_heads,
                    kv_heads=c.num_kv_heads, head_dim=c.head_dim)


def render_moe_source(shape: MoEShape) -> str:
    """The FFN source (its helpers and the decode-step kernels; no dense FFN kernel instantiated) followed by the
    MoE kernels."""
    import jinja2
    ffn = KernelShape(shape.name, shape.hidden, shape.inter, shape.dtype, (), shape.max_rank, batches=(1,),
                      heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    check_shape(ffn, "targets.cuda")
    ctype, _, pair, pair_to_f2, floats_to_pair = DTYPES[shape.dtype]
    launch = ffn_launch(shape.hidden, 1)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    moe = env.get_template("moe.cu.j2").render(
        name=shape.name, hidden=shape.hidden, experts=shape.experts, top_k=shape.top_k, dtype_c=ctype, pair_c=pair,
        pair_to_float2=pair_to_f2, floats_to_pair=floats_to_pair, max_rank=max(8, shape.max_rank),
        predict={"vpt": launch["vpt"], "threads": launch["threads"], "rpb": 2,
                 "rvec_per_lane": max(1, math.ceil(shape.max_rank / 8 / 32)), "npw": 8},
        moe_variants=[launch | {"act_enum": ACTIVATION_ENUM[a]} for a in shape.activations])
    return render_source(ffn) + "\n" + moe


def moe_weights(ir: ModelIR, i: int) -> dict:
    """Layer i's router and stacked expert weights in the runtime's names and layouts (module docstring)."""
    import torch
    w, layer, rank = ir.weights, ir.layers[i], layer_rank(ir.layers[i])
    names = [ffn_names(i, e) for e in range(ir.config.num_experts)]
    p = f"layers.{i}."
    out = {p + "router": w[f"model.layers.{i}.block_sparse_moe.gate.weight"],
           p + "gate": torch.cat([w[g] for g, _, _ in names]), p + "up": torch.cat([w[u] for _, u, _ in names]),
           p + "down_t": torch.cat([w[d].T for _, _, d in names])}
    if rank:
        H, I = ir.config.hidden_size, ir.config.intermediate_size
        fc1, fc2 = torch.zeros(len(names) * rank, H), torch.zeros(len(names) * I, rank)
        for e, ann in enumerate(layer.experts):
            if ann.mode == "predictor" and ann.predictor is not None:
                a, b = (w[n] for n in predictor_names(i, e))
                fc1[e * rank: e * rank + a.shape[0]] = a
                fc2[e * I: (e + 1) * I, : b.shape[1]] = b
        out[p + "fc1"], out[p + "fc2"] = fc1, fc2
    return out


def expert_params(experts, device):
    """float32 [experts, 4]: the kernels' ExpertParams (threshold, predictor threshold, has predictor, relu)."""
    import torch
    return torch.tensor([[f.threshold, f.predictor_threshold, float(f.gated), float(f.predictor_relu)]
                         for f in experts], dtype=torch.float32, device=device)


# ---- the generated kernels -------------------------------------------------------------------------------------

class MoEKernels:
    """ctypes bindings of the MoE entry points of a kernel library built from render_moe_source."""

    def __init__(self, lib):
        self.lib = lib   # a KernelLibrary (library.py)
        c = lib.lib
        c.tsc_moe_route.argtypes = [_P] * 4
        c.tsc_moe_predict.argtypes = [_P, _P, _P, _I, _P, _P, _P, _P, _P, _P]
        c.tsc_moe_experts.argtypes = [_I, _I] + [_P] * 9 + [_I] + [_P] * 4
        self.experts, self.top_k = c.tsc_num_experts(), c.tsc_top_k()

    def route(self, x, router, ws: MoEWorkspace) -> None:
        """ws.logits = the router logits of x [1, hidden] (predict and experts_ffn route from them)."""
        import torch
        self.lib._check(self.lib.lib.tsc_moe_route(
            x.data_ptr(), router.data_ptr(), ws.logits.data_ptr(), torch.cuda.current_stream().cuda_stream),
            "moe_route")

    def predict(self, x, fc1, fc2, params, ws: MoEWorkspace) -> None:
        """ws.lists[e][:ws.counts[e]] = the neurons routed expert e's predictor keeps (experts with a predictor)."""
        import torch
        self.lib._check(self.lib.lib.tsc_moe_predict(
            x.data_ptr(), fc1.data_ptr(), fc2.data_ptr(), fc1.shape[0] // self.experts, params.data_ptr(),
            ws.logits.data_ptr(), ws.z.data_ptr(), ws.lists.data_ptr(), ws.counts.data_ptr(),
            torch.cuda.current_stream().cuda_stream), "moe_predict")

    def experts_ffn(self, x, gate, up, down_t, activation: str, params, ws: MoEWorkspace, y, grid: int,
                    residual=None, lists=None, counts=None) -> None:
        """y [1, hidden] = (residual +) sum over the routed experts of weight * FFN_e(x), each expert over its listed
        neurons (lists/counts, default the workspace's) or all of them when it has no predictor."""
        import torch
        lists = ws.lists if lists is None else lists
        counts = ws.counts if counts is None else counts
        self.lib._check(self.lib.lib.tsc_moe_experts(
            ACTIVATION_ENUM[activation], grid, x.data_ptr(), gate.data_ptr(), up.data_ptr(), down_t.data_ptr(),
            params.data_ptr(), ws.logits.data_ptr(), lists.data_ptr(),
            counts.data_ptr(), ws.partials.data_ptr(), ws.partials.shape[0], ws.barrier.data_ptr(),
            None if residual is None else residual.data_ptr(), y.data_ptr(), torch.cuda.current_stream().cuda_stream),
            "moe_experts")


class MoEWorkspace:
    """Device buffers of worst-case size, allocated once (graph capture bakes their addresses in)."""

    def __init__(self, kernels: MoEKernels, max_rank: int, device="cuda"):
        import torch
        lib, E, K = kernels.lib, kernels.experts, kernels.top_k
        self.logits = torch.zeros(E, dtype=torch.float32, device=device)
        self.z = torch.zeros(K, max(max_rank, 8), dtype=torch.float32, device=device)
        self.lists = torch.zeros(E, lib.inter, dtype=torch.int32, device=device)
        self.counts = torch.zeros(E, dtype=torch.int32, device=device)
        # moe_experts: each block's fp32 partial y (one block per multiprocessor: it asks for more than half of
        # one's shared memory, persistent_blocks in ffn.cu.j2), the barrier counter
        blocks = torch.cuda.get_device_properties(device).multi_processor_count
        self.partials = torch.zeros(blocks, lib.hidden, dtype=torch.float32, device=device)
        self.barrier = torch.zeros(1, dtype=torch.int32, device=device)


# ---- cuBLAS (the dense baseline's decode step) ------------------------------------------------------------------

CUDA_DTYPE = {"bfloat16": 14, "float16": 2}          # cudaDataType_t: CUDA_R_16BF, CUDA_R_16F
OP_N, OP_T, COMPUTE_32F, GEMM_DEFAULT = 0, 1, 68, -1   # cublasOperation_t, cublasComputeType_t, cublasGemmAlgo_t


@functools.lru_cache(maxsize=1)
def torch_cublas():
    """The libcublas torch loaded (torch.cuda.current_blas_handle() hands out handles of that very library)."""
    import torch
    torch.cuda.current_blas_handle()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if re.search(r"/libcublas\.so[.\d]*$", path):
            lib = ctypes.CDLL(path)
            lib.cublasGemmBatchedEx.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I,
                                                _I, _I, _I]
            return lib
    raise RuntimeError("torch has not loaded libcublas; the dense MoE baseline needs it")


class CublasExperts:
    """One token through one MoE layer, dense, graph-capturable: the router in PyTorch, then the routed experts'
    gate/up rows (one batched GEMM of 2k products) and down rows (k products) through cuBLAS, the matrix pointers
    computed on the GPU from the routing: no host round trip and no copy of an expert's weights."""

    def __init__(self, layer: MoELayer):
        import torch
        self.layer = L = layer
        H, I, K, dev, dt = L.hidden, L.inter, L.top_k, L.gate.device, L.gate.dtype
        self.x = torch.zeros(1, H, dtype=dt, device=dev)
        self.gu = torch.zeros(2 * K, I, dtype=dt, device=dev)   # gate rows of the k experts, then their up rows
        self.h = torch.zeros(K, I, dtype=dt, device=dev)
        self.y = torch.zeros(K, H, dtype=dt, device=dev)
        es = dt.itemsize
        self.expert_bytes = I * H * es
        ptrs = functools.partial(torch.arange, dtype=torch.int64, device=dev)
        self.b_gu = torch.full((2 * K,), self.x.data_ptr(), dtype=torch.int64, device=dev)
        self.c_gu = self.gu.data_ptr() + ptrs(2 * K) * I * es
        self.b_down = self.h.data_ptr() + ptrs(K) * I * es
        self.c_down = self.y.data_ptr() + ptrs(K) * H * es
        self.dtype = CUDA_DTYPE[str(dt).removeprefix("torch.")]
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _gemm(self, op, m: int, k: int, a, lda: int, b, ldb: int, c, ldc: int) -> None:
        """C_i (m x 1) = op(A_i) B_i for every pointer triple, column-major as cuBLAS sees our row-major rows."""
        import torch
        err = torch_cublas().cublasGemmBatchedEx(
            torch.cuda.current_blas_handle(), op, OP_N, m, 1, k, ctypes.byref(self.alpha), a.data_ptr(), self.dtype,
            lda, b.data_ptr(), self.dtype, ldb, ctypes.byref(self.beta), c.data_ptr(), self.dtype, ldc, a.shape[0],
            COMPUTE_32F, GEMM_DEFAULT)
        if err:
            raise RuntimeError(f"cublasGemmBatchedEx failed with status {err}")

    def __call__(self, x):
        import torch
        L, K = self.layer, self.layer.top_k
        weight, idx = L.route(x)
        self.x.copy_(x)
        offset = idx[0] * self.expert_bytes
        a_gu = torch.cat([L.gate.data_ptr() + offset, L.up.data_ptr() + offset])
        self._gemm(OP_T, L.inter, L.hidden, a_gu, L.hidden, self.b_gu, L.hidden, self.c_gu, L.inter)
        self.h.copy_(L.activate(self.gu[:K], self.gu[K:], idx[0]))
        self._gemm(OP_N, L.hidden, L.inter, L.down_t.data_ptr() + offset, L.hidden, self.b_down, L.inter,
                   self.c_down, L.hidden)
        return (self.y * weight[0, :, None]).sum(0, keepdim=True)


# ---- the layer -------------------------------------------------------------------------------------------------

class MoELayer:
    """Layer i's mixture of experts in the GPU decoder (model.py): decode_into for one token (generated kernels, or
    cuBLAS for the dense baseline), dense for prompts."""

    def __init__(self, cfg, spec, weights: dict, i: int, kernels: MoEKernels | None = None,
                 ws: MoEWorkspace | None = None, grid: int = 0):
        p = f"layers.{i}."
        self.hidden, self.inter, self.top_k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
        self.router, self.gate, self.up, self.down_t = (weights[p + n] for n in ("router", "gate", "up", "down_t"))
        self.fc1, self.fc2 = weights.get(p + "fc1"), weights.get(p + "fc2")
        self.activation = spec.experts[0].activation
        self.params = expert_params(spec.experts, self.gate.device)
        self.thresholds = self.params[:, 0]
        self.any_threshold = any(f.threshold > 0 for f in spec.experts)
        self.kernels, self.ws, self.grid = kernels, ws, grid
        self.cublas: CublasExperts | None = None

    def route(self, x):
        """(weights [T, k] in x's dtype, experts [T, k]) exactly as tscompile/reference.py's MoE."""
        import torch.nn.functional as F
        probs = F.linear(x, self.router).float().softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), idx

    def activate(self, g, u, experts):
        """h of rows g, u [n, inter] that belong to `experts` [n], zero where |h| <= that expert's threshold."""
        from tscompile.reference import activate
        h = activate(self.activation, g, u)
        return h * (h.abs() > self.thresholds[experts][:, None]) if self.any_threshold else h

    def dense(self, x):
        """FFN output [T, hidden] of x [T, hidden], every routed expert over all its neurons; the host reads the
        routing (prompts, and the CPU)."""
        import torch
        import torch.nn.functional as F
        weight, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            rs = slice(e * self.inter, (e + 1) * self.inter)
            xe = x[rows]
            h = self.activate(F.linear(xe, self.gate[rs]), F.linear(xe, self.up[rs]), idx.new_full(rows.shape, e))
            out.index_add_(0, rows, (h @ self.down_t[rs]) * weight[rows, slot, None])
        return out

    def decode_into(self, hn, x):
        """x + MoE(hn) for one token, the routing kept on the GPU: in place through the generated kernels, or (the
        dense baseline) through cuBLAS."""
        if self.kernels is None:
            self.cublas = self.cublas or CublasExperts(self)
            return x + self.cublas(hn)
        k, ws = self.kernels, self.ws
        k.route(hn, self.router, ws)
        if self.fc1 is not None:
            k.predict(hn, self.fc1, self.fc2, self.params, ws)
        k.experts_ffn(hn, self.gate, self.up, self.down_t, self.activation, self.params, ws, x, self.grid, residual=x)
        return x


def moe_layers(decoder) -> list[MoELayer]:
    """The MoE layers of a GPUDecoder (model.py); with its kernel library they share one workspace."""
    kernels = ws = None
    grid = 0
    if decoder.lib is not None and not decoder.dense:
        from .library import default_grid
        kernels = MoEKernels(decoder.lib)
        ranks = [w.shape[0] // kernels.experts for n, w in decoder.w.items() if n.endswith(".fc1")]
        ws = MoEWorkspace(kernels, max(ranks, default=8), decoder.dev)
        grid = default_grid(decoder.dev)
    return [MoELayer(decoder.cfg, decoder.ffns[i], decoder.w, i, kernels, ws, grid)
            for i in range(decoder.cfg.num_layers)]
