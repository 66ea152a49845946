"""One Mixtral-8x7B MoE layer (hidden 4096, 8 experts of intermediate 14336, top-2, bf16, batch 1) on the GPU: the
generated MoE kernels vs the dense experts in the same runtime.

    python benchmarks/cuda_moe.py [--out benchmarks/results/cuda_moe.json]

Measured in one run, side by side, with the method and timing helpers of benchmarks/cuda_ffn.py (median of CUDA-event
timed graph replays after warm-up; every replay cycles through 8 inputs, so the routing changes call to call, and
8 sets of active lists, so no set stays in L2):
  copy bandwidth (bytes read + written)
  dense    the runtime's dense MoE decode step (backends/cuda/moe.py CublasExperts: router in PyTorch, the routed
           experts through two cuBLAS batched GEMMs whose pointers are computed on the GPU), and as a floor for any
           dense implementation, plain cuBLAS FFNs (torch F.linear) on the 2 experts picked on the host beforehand
  sparse   90% per-expert sparsity: router + one grouped kernel over the routed experts' active lists (fresh random
           sets, as a perfect predictor would give), and router + per-expert rank-256 predictors (thresholds at the
           90th percentile of their logits) + the grouped kernel
Every configuration is first checked against a float64 reference on fresh inputs, outputs poisoned.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_ffn import benchmark_setup, copy_bandwidth, rel_err, time_graph, warm_up_clocks
from tscompile.backends.cuda.kernels import KernelShape, compile_library, device_arch, render_source
from tscompile.backends.cuda.library import KernelLibrary, Workspace
from tscompile.backends.cuda.model import FFNSpec
from tscompile.backends.cuda.moe import (
    CublasExperts,
    MoEKernels,
    MoELayer,
    MoEShape,
    MoEWorkspace,
    expert_params,
    render_moe_source,
)
from tscompile.cache import write_text_atomic

H, I, E, K, RANK = 4096, 14336, 8, 2, 256
SPARSITY = 0.9
SETS = 8   # inputs (routings) and active-list sets cycled within one graph replay


def kernel_route(logits):
    """(experts [K], weights [K]) as the kernels route: the K largest logits (equal ones: the lower expert first),
    weights the softmax over those K."""
    top, experts = logits.double().sort(descending=True, stable=True)
    weights = (top[:K] - top[0]).exp()
    return experts[:K], weights / weights.sum()


def moe_reference(x, w, experts, weights, ids_of):
    """float64 y [1, H] = sum over the routed experts e of weight * FFN_e(x) over the neurons ids_of(e)."""
    xd, y = x.double(), torch.zeros(1, H, dtype=torch.float64, device=x.device)
    for wk, e in zip(weights.tolist(), experts.tolist()):
        rows = e * I + ids_of(e)
        h = F.silu(xd @ w["gate"][rows].double().T) * (xd @ w["up"][rows].double().T)
        y += wk * (h @ w["down_t"][rows].double())
    return y


def same_rows_through_sparse_ffn(ffn_lib, w, x, lists, n, grid) -> dict:
    """Where the time goes: the rows the grouped kernel reads for each input (its routed experts' active lists),
    through the dense model's sparse_ffn (one FFN, no routing weights) as one list of 2n rows, (a) in the stacked
    8-expert weights and (b) copied into compact 2-expert weights: us per call."""
    dev, ws = x.device, Workspace(ffn_lib, 8, 1, x.device)
    rows = torch.zeros(SETS, I, dtype=torch.int32, device=dev)           # rows in the stacked weights
    compact_rows = torch.zeros(SETS, I, dtype=torch.int32, device=dev)   # the same rows in the compact copy
    compact = {k: [] for k in ("gate", "up", "down_t")}
    for s in range(SETS):
        experts = F.linear(x[s], w["router"]).float()[0].topk(K).indices.tolist()
        rows[s, : K * n] = torch.cat([e * I + lists[s, e, :n] for e in experts])
        compact_rows[s, : K * n] = torch.cat([k * I + lists[s, e, :n] for k, e in enumerate(experts)])
        for name, copies in compact.items():
            copies.append(torch.cat([w[name][e * I:(e + 1) * I] for e in experts]))
    count = torch.full((1,), K * n, dtype=torch.int32, device=dev)
    y = torch.empty(1, H, device=dev, dtype=x.dtype)

    def stacked():
        for s in range(SETS):
            ffn_lib.sparse_ffn(x[s], w["gate"], w["up"], w["down_t"], "swiglu", 0.0, rows[s], count, None, ws, y, grid)

    def compacted():
        for s in range(SETS):
            ffn_lib.sparse_ffn(x[s], compact["gate"][s], compact["up"][s], compact["down_t"][s], "swiglu", 0.0,
                               compact_rows[s], count, None, ws, y, grid)
    return {"stacked_8_experts_us": time_graph(stacked, SETS), "compact_2_experts_us": time_graph(compacted, SETS)}


def main():
    args, dev, props = benchmark_setup("benchmarks/results/cuda_moe.json")
    sms = props.multi_processor_count
    with tempfile.TemporaryDirectory() as tmp:
        src = render_moe_source(MoEShape("mixtral-8x7b-moe", H, I, E, K, "bfloat16", ("swiglu",), RANK))
        kernels = MoEKernels(KernelLibrary(compile_library(src, device_arch(), Path(tmp) / "moe")))
        ffn_src = render_source(KernelShape("mixtral-expert-rows", H, I, "bfloat16", ("swiglu",), batches=(1,)))
        ffn_lib = KernelLibrary(compile_library(ffn_src, device_arch(), Path(tmp) / "ffn"))

    warm_up_clocks()
    bw = copy_bandwidth()
    bf = torch.bfloat16
    w = {"router": torch.randn(E, H, device=dev, dtype=bf) / H ** 0.5,
         "gate": torch.randn(E * I, H, device=dev, dtype=bf) / H ** 0.5,
         "up": torch.randn(E * I, H, device=dev, dtype=bf) / H ** 0.5,
         "down_t": torch.randn(E * I, H, device=dev, dtype=bf) / I ** 0.5,
         "fc1": torch.randn(E * RANK, H, device=dev, dtype=bf) / H ** 0.5,
         "fc2": torch.randn(E * I, RANK, device=dev, dtype=bf) / RANK ** 0.5}
    x = torch.randn(SETS, 1, H, device=dev, dtype=bf)
    y = torch.empty(SETS, 1, H, device=dev, dtype=bf)
    ws = MoEWorkspace(kernels, RANK, dev)

    # ---- dense: the runtime's cuBLAS step, and plain cuBLAS FFNs on host-picked experts ---------------------------
    cfg = SimpleNamespace(hidden_size=H, intermediate_size=I, num_experts_per_tok=K)
    dense_spec = FFNSpec("swiglu", 0.0, experts=[FFNSpec("swiglu", 0.0)] * E)
    layer = MoELayer(cfg, dense_spec, {f"layers.0.{k}": v for k, v in w.items()}, 0)
    cublas = CublasExperts(layer)
    all_ids = torch.arange(I, device=dev)
    dense_errs = []
    for s in range(SETS):
        for buf in (cublas.gu, cublas.h, cublas.y):
            buf.fill_(float("nan"))
        got = cublas(x[s])
        weight, idx = layer.route(x[s])   # the runtime's own routing
        dense_errs.append(rel_err(got, moe_reference(x[s], w, idx[0], weight[0], lambda e: all_ids)))
    host_experts = [layer.route(x[s])[1][0].tolist() for s in range(SETS)]

    def dense_runtime():
        for s in range(SETS):
            cublas(x[s])

    def dense_fixed():   # the two experts' FFNs as plain cuBLAS GEMVs (experts known on the host: a floor)
        for s in range(SETS):
            for e in host_experts[s]:
                rs = slice(e * I, (e + 1) * I)
                h = F.silu(F.linear(x[s], w["gate"][rs])) * F.linear(x[s], w["up"][rs])
                h @ w["down_t"][rs]
    dense = {"runtime_us": time_graph(dense_runtime, SETS), "fixed_experts_cublas_us": time_graph(dense_fixed, SETS)}
    dense_bytes = K * 3 * I * H * 2 + E * H * 2
    print(f"device {props.name}, {sms} SMs; copy {bw:.0f} GB/s; dense {dense} "
          f"({dense_bytes / dense['runtime_us'] / 1e3:.0f} GB/s), max rel err {max(dense_errs):.1e}", flush=True)

    # ---- sparse, given active lists (a perfect predictor) ----------------------------------------------------------
    n = round((1 - SPARSITY) * I)
    lists = torch.stack([torch.stack([torch.randperm(I, device=dev) for _ in range(E)]) for _ in range(SETS)]).int()
    counts = torch.full((SETS, E), n, dtype=torch.int32, device=dev)
    listed = expert_params([FFNSpec("swiglu", 0.0, "predictor")] * E, dev)

    def sparse_lists():
        for s in range(SETS):
            kernels.route(x[s], w["router"], ws)
            kernels.experts_ffn(x[s], w["gate"], w["up"], w["down_t"], "swiglu", listed, ws, y[s], sms,
                                lists=lists[s], counts=counts[s])
    errs, routings = [], set()
    y.fill_(float("nan"))
    for s in range(SETS):
        kernels.route(x[s], w["router"], ws)
        kernels.experts_ffn(x[s], w["gate"], w["up"], w["down_t"], "swiglu", listed, ws, y[s], sms, lists=lists[s],
                            counts=counts[s])
        routed, weights = kernel_route(ws.logits)
        errs.append(rel_err(y[s], moe_reference(x[s], w, routed, weights, lambda e, s=s: lists[s, e, :n].long())))
        routings.add(tuple(sorted(routed.tolist())))

    def route_only():
        for s in range(SETS):
            kernels.route(x[s], w["router"], ws)
    sparse_us, route_us = time_graph(sparse_lists, SETS), time_graph(route_only, SETS)
    probe = same_rows_through_sparse_ffn(ffn_lib, w, x, lists, n, sms)
    print(f"the same rows through the dense model's sparse_ffn (unweighted): {probe}", flush=True)
    sparse_bytes = K * 3 * n * H * 2 + E * H * 2
    sparse = {"active_per_expert": n, "max_rel_err": max(errs), "distinct_routings": len(routings),
              "us": sparse_us, "route_us": route_us, "bytes": sparse_bytes,
              "speedup_vs_dense_runtime": dense["runtime_us"] / sparse_us,
              "speedup_vs_fixed_experts_cublas": dense["fixed_experts_cublas_us"] / sparse_us,
              "bytes_floor_speedup": dense_bytes / sparse_bytes, "achieved_GBps": sparse_bytes / sparse_us / 1e3,
              "same_rows_through_sparse_ffn_us": probe}
    print(json.dumps(sparse), flush=True)

    # ---- sparse with rank-256 predictors -----------------------------------------------------------------------------
    calib = torch.randn(64, H, device=dev, dtype=bf).double()
    z = F.relu(torch.einsum("th,erh->ter", calib, w["fc1"].double().view(E, RANK, H)))
    pred_logits = torch.einsum("ter,eir->tei", z, w["fc2"].double().view(E, I, RANK))
    thresholds = pred_logits.transpose(0, 1).reshape(E, -1).float().quantile(SPARSITY, dim=1)
    predicted = expert_params([FFNSpec("swiglu", 0.0, "predictor", float(t)) for t in thresholds], dev)

    def sparse_predicted():
        for s in range(SETS):
            kernels.route(x[s], w["router"], ws)
            kernels.predict(x[s], w["fc1"], w["fc2"], predicted, ws)
            kernels.experts_ffn(x[s], w["gate"], w["up"], w["down_t"], "swiglu", predicted, ws, y[s], sms)

    def route_and_predict():
        for s in range(SETS):
            kernels.route(x[s], w["router"], ws)
            kernels.predict(x[s], w["fc1"], w["fc2"], predicted, ws)
    errs, active = [], []
    y.fill_(float("nan"))
    for s in range(SETS):
        kernels.route(x[s], w["router"], ws)
        kernels.predict(x[s], w["fc1"], w["fc2"], predicted, ws)
        kernels.experts_ffn(x[s], w["gate"], w["up"], w["down_t"], "swiglu", predicted, ws, y[s], sms)
        routed, weights = kernel_route(ws.logits)
        errs.append(rel_err(y[s], moe_reference(x[s], w, routed, weights,
                                                lambda e: ws.lists[e, : int(ws.counts[e])].long())))
        active += [int(ws.counts[e]) for e in routed.tolist()]
    pred_us, predict_us = time_graph(sparse_predicted, SETS), time_graph(route_and_predict, SETS)
    m = sum(active) / len(active)
    pred_bytes = K * (3 * m * H + RANK * H + I * RANK) * 2 + E * H * 2
    predictor = {"rank": RANK, "mean_active_per_expert": m, "active_fraction": m / I, "max_rel_err": max(errs),
                 "us": pred_us, "route_and_predict_us": predict_us, "bytes": pred_bytes,
                 "speedup_vs_dense_runtime": dense["runtime_us"] / pred_us,
                 "speedup_vs_fixed_experts_cublas": dense["fixed_experts_cublas_us"] / pred_us,
                 "achieved_GBps": pred_bytes / pred_us / 1e3}
    print(json.dumps(predictor), flush=True)

    bw = max(bw, copy_bandwidth())   # again, at the end: report the better of the two
    for r in (sparse, predictor):
        r["fraction_of_copy_bw"] = r["achieved_GBps"] / bw
        r["bytes_at_copy_bw_us"] = r["bytes"] / bw / 1e3   # the time floor of these bytes
    result = {"device": props.name, "sms": sms, "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "shape": {"hidden": H, "intermediate": I, "experts": E, "top_k": K, "dtype": "bfloat16", "batch": 1,
                        "sparsity": SPARSITY},
              "copy_GBps": bw,
              "dense": dense | {"bytes": dense_bytes, "max_rel_err": max(dense_errs),
                                "runtime_GBps": dense_bytes / dense["runtime_us"] / 1e3,
                                "fixed_experts_GBps": dense_bytes / dense["fixed_experts_cublas_us"] / 1e3},
              "sparse_given_lists": sparse, "sparse_with_predictor": predictor}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"\n{props.name}: copy {bw:.0f} GB/s; dense runtime {dense['runtime_us']:.1f} us, cuBLAS on fixed experts "
          f"{dense['fixed_experts_cublas_us']:.1f} us")
    for name, r in (("sparse, given lists", sparse), (f"sparse, rank-{RANK} predictors", predictor)):
        print(f"{name:>28}: {r['us']:6.1f} us  {r['speedup_vs_dense_runtime']:.2f}x dense runtime, "
              f"{r['speedup_vs_fixed_experts_cublas']:.2f}x fixed-expert cuBLAS, {r['achieved_GBps']:.0f} GB/s "
              f"({100 * r['fraction_of_copy_bw']:.0f}% of copy), err {r['max_rel_err']:.1e}")
    print(f"router alone {route_us:.1f} us, router + predictors {predict_us:.1f} us")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
