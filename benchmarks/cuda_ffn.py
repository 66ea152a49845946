"""One Mistral-7B FFN layer (hidden 4096, intermediate 14336, bf16) on the GPU: generated sparse kernels vs cuBLAS.

    python benchmarks/cuda_ffn.py [--out benchmarks/results/cuda_ffn.json]

Measured in one run, side by side: the device-to-device copy bandwidth (bytes read + written), the dense FFN
through cuBLAS (torch F.linear, best of three forms, in a CUDA graph), the sparse FFN at sparsity 0.5/0.8/0.9/0.95
(batch 1, plus batches 2/4/8 at 0.9), the rank-256 predictor, and
the decode step's generated GEMVs (RMSNorm folded in) against cuBLAS on the same matrices (q/k/v of Mistral-7B;
gate + up + activation of the FFN), and exact gating without a predictor (ProSparse's operator: a GEMV of the gate,
then the listed neurons' rows; dReLU with 50/20/10% of gates positive, SwiGLU with half of h under a threshold).
Every timing is the median of CUDA-event timed
graph replays after warm-up; each replay cycles through 8 random active sets (fresh ids, so no set stays in L2).
Every sparse configuration is first checked against a float64 reference on fresh random inputs, outputs poisoned.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tscompile.backends.cuda.kernels import KernelShape, compile_library, device_arch, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary, Workspace  # noqa: E402
from tscompile.cache import write_text_atomic  # noqa: E402

H, I, RANK = 4096, 14336, 256
SETS = 8   # active sets cycled within one graph replay


def time_graph(fn, calls_per_replay: int, replays: int = 30, repeats: int = 7) -> float:
    """Median microseconds per call of `fn` (which makes `calls_per_replay` calls) captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (replays * calls_per_replay))
    return statistics.median(times)


def warm_up_clocks(seconds: float = 1.0) -> None:
    """Run matrix products until the SM clock has left its idle state (345 MHz seen idle on an H200)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t[0].record()
    while True:
        for _ in range(20):
            a @ a
        t[1].record()
        torch.cuda.synchronize()
        if t[0].elapsed_time(t[1]) > seconds * 1e3:
            return


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(512 * 1024**2, device="cuda")
    dst = torch.empty_like(src)
    # the faster of a copy-engine memcpy and an elementwise kernel (the kernel path is what SMs can reach)
    us = min(time_graph(lambda: dst.copy_(src), 1, replays=10),
             time_graph(lambda: torch.neg(src, out=dst), 1, replays=10))
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def ffn_reference(x, wg, wu, wdt, ids, threshold, masks=None):
    """float64 y [B, H] of the FFN restricted to neurons `ids` (swiglu), masks [B, I] bool per token or None."""
    xd = x.double()
    g = xd @ wg[ids].double().T
    u = xd @ wu[ids].double().T
    h = F.silu(g) * u
    h = h * (h.abs() > threshold)
    if masks is not None:
        h = h * masks[:, ids]
    return h @ wdt[ids].double()


def rel_err(out, ref) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def exact_gating(lib, ws, wg, wu, wdt, dense_us: float, grid: int) -> list[dict]:
    """Exact gating, batch 1: gemv g = Wg x, then sparse_ffn_exact over the neurons with g > 0 (dReLU) or all of them
    (SwiGLU), down rows only where h != 0. The share of positive gates is set through input channel 0, held at 8 in
    every input (a gate bias, as the large constant channels of real models give one): Wg[:, 0] = -z / 8 with z the
    normal quantile of the wanted share (the rest of g is ~N(0, 1))."""
    dev, bf = wg.device, wg.dtype
    x = torch.randn(SETS, 1, H, device=dev, dtype=bf)
    x[:, :, 0] = 8
    g = torch.empty(SETS, 1, I, device=dev, dtype=torch.float32)
    positive = torch.empty(SETS, -(-I // 16), device=dev, dtype=torch.int16)   # the sign bits of g
    y = torch.empty(SETS, 1, H, device=dev, dtype=bf)
    rows = []
    for kind, share in (("drelu", 0.5), ("drelu", 0.2), ("drelu", 0.1), ("swiglu", None)):
        w_gate = wg.clone()
        if share is not None:
            w_gate[:, 0] = -statistics.NormalDist().inv_cdf(1 - share) / 8
        xd = x.double()
        gd, ud = xd @ w_gate.double().T, xd @ wu.double().T
        h = F.relu(gd) * F.relu(ud) if kind == "drelu" else F.silu(gd) * ud
        threshold = 0.0 if kind == "drelu" else float(h.abs().float().quantile(0.5))   # SwiGLU: half of h zeroed
        h = h * (h.abs() > threshold)
        listed = kind == "drelu"

        def step():
            for k in range(SETS):
                if listed:
                    lib.gemv(x[k], w_gate, g[k], positive=positive[k])
                lib.sparse_ffn_exact(x[k], w_gate, wu, wdt, kind, threshold, (g[k], positive[k]) if listed else None,
                                     ws, y[k], grid)
        y.fill_(float("nan"))
        step()
        torch.cuda.synchronize()
        err = max(rel_err(y[k], h[k] @ wdt.double()) for k in range(SETS))
        assert err <= 1e-2, (kind, share, err)
        assert int(ws.barrier.item()) & 0x7FFFFFFF == 0, "grid barrier counter left mid-count"
        us = time_graph(step, SETS)
        share_listed = float((g > 0).float().mean()) if listed else 1.0
        share_nonzero = float((h != 0).float().mean())
        nbytes = (I + share_listed * I + share_nonzero * I) * H * 2   # all of Wg: by the GEMV (dReLU) or the rows
        row = {"activation": kind, "listed": share_listed, "nonzero_h": share_nonzero, "threshold": threshold,
               "max_rel_err": err, "us": us, "speedup_vs_dense": dense_us / us,
               "bytes_floor_speedup": 3 * I * H * 2 / nbytes, "achieved_GBps": nbytes / us / 1e3}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gemv_vs_cublas(lib, x, wg, wu, wd, wgu) -> dict:
    """The decode step's GEMVs (RMSNorm folded in) against cuBLAS after a separate RMSNorm, same matrices, us per
    call: q/k/v of Mistral-7B (6144 x 4096), act(gate) * up of the FFN (2 x 14336 x 4096), and the dense FFN
    with that GEMV + cuBLAS down (the decode benchmark's dense baseline) against all-cuBLAS."""
    dev, bf = x.device, x.dtype
    wqkv = torch.randn(6144, H, device=dev, dtype=bf) / H ** 0.5
    norm = (1 + 0.1 * torch.randn(H, device=dev)).to(bf)
    yq = torch.empty(SETS, 1, 6144, device=dev, dtype=bf)
    h = torch.empty(SETS, 1, I, device=dev, dtype=bf)

    def normed(k):
        return F.rms_norm(x[k], (H,), norm, 1e-5)

    def qkv_ours():
        for k in range(SETS):
            lib.gemv(x[k], wqkv, yq[k], norm=norm, eps=1e-5)

    def qkv_cublas():
        for k in range(SETS):
            F.linear(normed(k), wqkv)

    def gate_up_ours():
        for k in range(SETS):
            lib.gemv(x[k], wg, h[k], norm=norm, eps=1e-5, up=wu, activation="swiglu")

    def gate_up_cublas():
        for k in range(SETS):
            g, u = F.linear(normed(k), wgu).chunk(2, dim=-1)
            F.silu(g) * u

    def ffn_ours_gate_up():
        for k in range(SETS):
            lib.gemv(x[k], wg, h[k], norm=norm, eps=1e-5, up=wu, activation="swiglu")
            torch.addmm(x[k], h[k], wd.T)

    def ffn_cublas():
        for k in range(SETS):
            g, u = F.linear(normed(k), wgu).chunk(2, dim=-1)
            torch.addmm(x[k], F.silu(g) * u, wd.T)
    qkv_ours()
    gate_up_ours()
    torch.cuda.synchronize()
    want_q = torch.stack([F.linear(normed(k).double(), wqkv.double()) for k in range(SETS)])
    g, u = torch.stack([F.linear(normed(k).double(), wgu.double()) for k in range(SETS)]).chunk(2, dim=-1)
    out = {"qkv_rel_err": rel_err(yq, want_q), "gate_up_rel_err": rel_err(h, F.silu(g) * u)}
    for name, fn in (("qkv_ours_us", qkv_ours), ("qkv_cublas_us", qkv_cublas), ("gate_up_ours_us", gate_up_ours),
                     ("gate_up_cublas_us", gate_up_cublas), ("ffn_ours_gate_up_us", ffn_ours_gate_up),
                     ("ffn_cublas_us", ffn_cublas)):
        out[name] = time_graph(fn, SETS)
    out["qkv_ours_GBps"] = wqkv.numel() * 2 / out["qkv_ours_us"] / 1e3
    out["gate_up_ours_GBps"] = 2 * wg.numel() * 2 / out["gate_up_ours_us"] / 1e3
    return out


def benchmark_setup(default_out: str):
    """The benchmark's command line (--out), a seeded RNG, the GPU and its properties: (args, device, properties)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    return args, dev, torch.cuda.get_device_properties(dev)


def main():
    args, dev, props = benchmark_setup("benchmarks/results/cuda_ffn.json")
    sms = props.multi_processor_count

    with tempfile.TemporaryDirectory() as tmp:
        shape = KernelShape("mistral-7b-ffn", H, I, "bfloat16", ("swiglu", "drelu"), RANK, heads=32, kv_heads=8,
                            head_dim=128)
        lib = KernelLibrary(compile_library(render_source(shape), device_arch(), Path(tmp)))

    warm_up_clocks()
    bw = copy_bandwidth()
    bf = torch.bfloat16
    wg = torch.randn(I, H, device=dev, dtype=bf) / H ** 0.5
    wu = torch.randn(I, H, device=dev, dtype=bf) / H ** 0.5
    wdt = torch.randn(I, H, device=dev, dtype=bf) / I ** 0.5
    wd = wdt.T.contiguous()                 # HF layout [H, I] for cuBLAS
    wgu = torch.cat([wg, wu])               # gate and up in one GEMV
    x = torch.randn(SETS, 1, H, device=dev, dtype=bf)
    ws = Workspace(lib, RANK, 8)

    def dense_variants(xs) -> dict:
        """us of the dense FFN (cuBLAS) on xs [SETS, B, H], three ways, each in a graph."""
        def dense_3():
            for k in range(SETS):
                h = F.silu(F.linear(xs[k], wg)) * F.linear(xs[k], wu)
                F.linear(h, wd)

        def dense_fused_gu():
            for k in range(SETS):
                g, u = F.linear(xs[k], wgu).chunk(2, dim=-1)
                F.linear(F.silu(g) * u, wd)

        def dense_down_t():
            for k in range(SETS):
                h = F.silu(F.linear(xs[k], wg)) * F.linear(xs[k], wu)
                h @ wdt
        return {"3 linears": time_graph(dense_3, SETS), "gate+up fused": time_graph(dense_fused_gu, SETS),
                "down as h @ Wd^T": time_graph(dense_down_t, SETS)}
    dense = dense_variants(x)
    dense_us = min(dense.values())
    dense_bytes = 3 * I * H * 2
    rows = []
    print(f"device {props.name}, {sms} SMs; copy {bw:.0f} GB/s; dense cuBLAS {dense_us:.1f} us "
          f"({dense_bytes / dense_us / 1e3:.0f} GB/s) {dense}", flush=True)

    for batch, sparsity in [(1, 0.5), (1, 0.8), (1, 0.9), (1, 0.95), (2, 0.9), (4, 0.9), (8, 0.9)]:
        n = round((1 - sparsity) * I)
        ids = torch.stack([torch.randperm(I, device=dev)[:n] for _ in range(SETS)]).int()
        ids_full = torch.zeros(SETS, I, dtype=torch.int32, device=dev)
        ids_full[:, :n] = ids
        count = torch.full((1,), n, dtype=torch.int32, device=dev)
        xb = torch.randn(SETS, batch, H, device=dev, dtype=bf)
        batch_dense_us = dense_us if batch == 1 else min(dense_variants(xb).values())   # cuBLAS, same batch
        masks = (torch.rand(SETS, batch, I, device=dev) < 0.8) if batch > 1 else None
        masks_u8 = masks.to(torch.uint8) if masks is not None else None
        y = torch.empty(SETS, batch, H, device=dev, dtype=bf)
        threshold = 1e-3
        def sparse():   # one block per SM: the library caps the grid at the blocks that fit at once
            for k in range(SETS):
                lib.sparse_ffn(xb[k], wg, wu, wdt, "swiglu", threshold, ids_full[k], count,
                               None if masks is None else masks_u8[k], ws, y[k], sms)
        # correctness: fresh inputs, poisoned outputs
        y.fill_(float("nan"))
        sparse()
        torch.cuda.synchronize()
        err = max(rel_err(y[k], ffn_reference(xb[k], wg, wu, wdt, ids[k].long(), threshold,
                                              None if masks is None else masks[k])) for k in range(SETS))
        assert int(ws.barrier.item()) & 0x7FFFFFFF == 0, "grid barrier counter left mid-count"
        sparse_us = time_graph(sparse, SETS)
        lib.set_dependent_launch(False)
        plain_us = time_graph(sparse, SETS)
        lib.set_dependent_launch(True)
        nbytes = 3 * n * H * 2
        row = {"batch": batch, "sparsity": sparsity, "active": n, "max_rel_err": err,
               "sparse_us": sparse_us, "plain_launch_us": plain_us,
               "dense_us": batch_dense_us, "speedup_vs_dense": batch_dense_us / sparse_us,
               "bytes_floor_speedup": dense_bytes / nbytes, "achieved_GBps": nbytes / sparse_us / 1e3,
               "fraction_of_copy_bw": nbytes / sparse_us / 1e3 / bw}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # predictor: rank 256, threshold chosen so that about 10% of neurons pass
    fc1 = torch.randn(RANK, H, device=dev, dtype=bf) / H ** 0.5
    fc2 = torch.randn(I, RANK, device=dev, dtype=bf) / RANK ** 0.5
    z = F.relu(x[0].float() @ fc1.float().T)
    thr = float((z @ fc2.float().T).quantile(0.9))
    y1 = torch.empty(1, H, device=dev, dtype=bf)
    lib.predict(x[0], fc1, fc2, True, thr, ws)
    torch.cuda.synchronize()
    got = set(ws.active[: int(ws.active_count.item())].tolist())
    logits = (F.relu(x[0].double() @ fc1.double().T) @ fc2.double().T)[0]
    want = set(torch.nonzero(logits >= thr).flatten().tolist())
    near = set(torch.nonzero((logits - thr).abs() < 1e-2 * logits.abs().max()).flatten().tolist())
    predictor_ok = (got ^ want) <= near

    def predict_only():
        for k in range(SETS):
            lib.predict(x[k], fc1, fc2, True, thr, ws)

    def predict_and_ffn(grid=sms):
        for k in range(SETS):
            lib.predict(x[k], fc1, fc2, True, thr, ws)
            lib.sparse_ffn(x[k], wg, wu, wdt, "swiglu", 0.0, ws.active, ws.active_count, None, ws, y1, grid)
    pred_us = time_graph(predict_only, SETS)
    both_us = time_graph(predict_and_ffn, SETS)
    lib.set_dependent_launch(False)   # the same two, with plain launches
    plain = {"predict_us": time_graph(predict_only, SETS), "predict_plus_ffn_us": time_graph(predict_and_ffn, SETS)}
    lib.set_dependent_launch(True)
    pred_bytes = RANK * H * 2 + I * RANK * 2
    predictor = {"rank": RANK, "active_fraction": len(got) / I, "set_matches_reference": predictor_ok,
                 "predict_us": pred_us, "predict_GBps": pred_bytes / pred_us / 1e3,
                 "predict_plus_ffn_us": both_us, "speedup_vs_dense_with_predictor": dense_us / both_us,
                 "without_dependent_launch": plain}
    print(json.dumps(predictor), flush=True)

    gemv = gemv_vs_cublas(lib, x, wg, wu, wd, wgu)
    print(json.dumps(gemv), flush=True)
    exact = exact_gating(lib, ws, wg, wu, wdt, dense_us, sms)

    bw = max(bw, copy_bandwidth())   # again, at the end: report the better of the two
    for r in rows:
        r["fraction_of_copy_bw"] = r["achieved_GBps"] / bw
    result = {"device": props.name, "sms": sms, "command": " ".join(["python", *sys.argv]),
              "torch": torch.__version__, "shape": {"hidden": H, "intermediate": I, "dtype": "bfloat16"},
              "copy_GBps": bw, "dense_us": dense_us, "dense_variants_us": dense, "sparse": rows,
              "predictor": predictor, "gemv": gemv, "exact_gating": exact}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"\n{props.name}: copy {bw:.0f} GB/s, dense cuBLAS {dense_us:.1f} us")
    print(f"{'batch':>5} {'sparsity':>8} {'us':>7} {'speedup':>7} {'floor':>6} {'GB/s':>6} {'%copy':>6} {'err':>8} "
          f"{'no-PDL us':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['sparsity']:>8} {r['sparse_us']:>7.1f} {r['speedup_vs_dense']:>7.2f} "
              f"{r['bytes_floor_speedup']:>6.1f} {r['achieved_GBps']:>6.0f} {100 * r['fraction_of_copy_bw']:>5.0f}% "
              f"{r['max_rel_err']:>8.1e} {r['plain_launch_us']:>9.1f}")
    print(f"predictor r={RANK}: {pred_us:.1f} us ({predictor['predict_GBps']:.0f} GB/s), active "
          f"{100 * predictor['active_fraction']:.1f}%, set ok {predictor_ok}; predictor+ffn {both_us:.1f} us "
          f"= {predictor['speedup_vs_dense_with_predictor']:.2f}x dense (plain launches: {plain})")
    for r in exact:
        print(f"exact gating {r['activation']}: listed {100 * r['listed']:.0f}%, h != 0 {100 * r['nonzero_h']:.0f}%: "
              f"{r['us']:.1f} us = {r['speedup_vs_dense']:.2f}x dense (bytes floor {r['bytes_floor_speedup']:.2f}x, "
              f"{r['achieved_GBps']:.0f} GB/s)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
