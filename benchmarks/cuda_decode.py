"""Whole-model decode on the GPU: the cuda runtime with the generated sparse kernels vs the same runtime with
every FFN dense through cuBLAS, both replaying CUDA graphs, after a 512-token prefill.

    python benchmarks/cuda_decode.py [--models mistral-7b,smollm2] [--out benchmarks/results/cuda_decode.json]

Models are random bf16 weights of the real shapes (built on the GPU, nothing to download): Mistral-7B
(32 layers, 4096/14336, 32 heads / 8 KV heads, vocab 32000) and SmolLM2-135M (30 layers, 576/1536, 9/3 heads,
vocab 49152, tied embeddings). Every FFN has a random low-rank predictor (rank 256 for Mistral, 64 for SmolLM2)
evaluated at every step, its threshold set per layer to the 90th percentile of its logits on the prompt, so about
10% of neurons are active; the active fraction actually reached during decode is measured and reported.
Tokens/s of the two runners are measured interleaved, median of repeats.
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
from tscompile.backends.cuda.kernels import KernelShape, compile_library, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary  # noqa: E402
from tscompile.backends.cuda.model import FFNSpec, GPUDecoder, layer_weight_names  # noqa: E402
from tscompile.backends.cuda.runtime import CudaRunner  # noqa: E402
from tscompile.ir import ArchConfig  # noqa: E402

MODELS = {
    "mistral-7b": (ArchConfig(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                              max_position_embeddings=32768), 256),
    "smollm2-135m": (ArchConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                                tie_word_embeddings=True, max_position_embeddings=8192), 64),
}
CONTEXT, TOKENS, REPEATS, ACTIVE = 512, 64, 5, 0.10


def random_weights(cfg: ArchConfig, rank: int) -> dict[str, torch.Tensor]:
    """Runtime-named weights (backends/cuda/lower.py), N(0, 1/fan_in), norms 1, built on the GPU in bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def rnd(*shape):
        return (torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16) / shape[-1] ** 0.5)
    w = {"embed": rnd(cfg.vocab_size, H) * H ** 0.5, "norm": torch.ones(H, device="cuda", dtype=torch.bfloat16)}
    if not cfg.tie_word_embeddings:
        w["lm_head"] = rnd(cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        n = layer_weight_names(i)
        w[n["input_norm"]] = w[n["post_norm"]] = w["norm"]
        w[n["qkv"]] = rnd((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, H)
        w[n["o"]] = rnd(H, cfg.num_heads * hd)
        w[n["gate"]], w[n["up"]], w[n["down_t"]] = rnd(I, H), rnd(I, H), rnd(I, H) * (H / I) ** 0.5
        w[n["fc1"]], w[n["fc2"]] = rnd(rank, H), rnd(I, rank)
    return w


def predictor_logits(w, i, hn):
    n = layer_weight_names(i)
    return F.relu(hn.float() @ w[n["fc1"]].float().T) @ w[n["fc2"]].float().T


def kernel_census(runner) -> dict:
    """Kernels of one decode step and their summed device time, FFN kernels apart (torch profiler over one graph
    replay); the rest of the step's wall time is launch gaps between dependent kernels."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = {"ffn": 0.0, "other": 0.0}
    count = {"ffn": 0, "other": 0}
    for e in kernels:
        kind = "ffn" if any(k in e.name for k in ("sparse_ffn", "predict_")) else "other"
        busy[kind] += getattr(e, "device_time", 0.0)
        count[kind] += 1
    return {"kernels": count, "device_busy_us": busy}


def bench_model(name: str, repeats: int) -> dict:
    cfg, rank = MODELS[name]
    major, minor = torch.cuda.get_device_capability()
    shape = KernelShape(name, cfg.hidden_size, cfg.intermediate_size, "bfloat16", ("swiglu",), rank, batches=(1,))
    with tempfile.TemporaryDirectory() as tmp:
        lib = KernelLibrary(compile_library(render_source(shape), f"sm_{major}{minor}", Path(tmp)))
    w = random_weights(cfg, rank)
    ffns = [FFNSpec("swiglu", 0.0, gated=True) for _ in range(cfg.num_layers)]
    sparse = CudaRunner(GPUDecoder(cfg, ffns, dict(w), lib, torch.bfloat16))
    prompt = torch.randint(0, cfg.vocab_size, (CONTEXT,), generator=torch.Generator().manual_seed(1)).tolist()

    # thresholds: 90th percentile of each layer's predictor logits over the prompt's tokens
    sparse.model.capture = []
    sparse.generate(prompt, 1)
    for i, hn in sparse.model.capture:
        if hn.shape[0] != CONTEXT:   # warm-up and graph-capture steps also pass through
            continue
        ffns[i].predictor_threshold = float(torch.quantile(predictor_logits(w, i, hn)[-256:].flatten(), 1 - ACTIVE))
    # active fraction reached at decode: FFN inputs of 8 decode steps run eagerly (same function as the graph)
    sparse.model.capture = []
    with torch.no_grad():
        for t in range(8):
            sparse.model.forward(torch.tensor([prompt[t]], device="cuda"),
                                 torch.tensor([CONTEXT + 1 + t], device="cuda"))
    fractions = [float((predictor_logits(w, i, hn) >= ffns[i].predictor_threshold).float().mean())
                 for i, hn in sparse.model.capture]
    sparse.model.capture = None
    sparse.graph = None   # re-capture with the calibrated thresholds (they are baked into the graph)

    dense = CudaRunner(GPUDecoder(cfg, ffns, dict(w), None, torch.bfloat16))
    s_tps, d_tps = [], []
    for _ in range(repeats):
        s_tps.append(sparse.decode_tokens_per_second(prompt, TOKENS))
        d_tps.append(dense.decode_tokens_per_second(prompt, TOKENS))
    s, d = statistics.median(s_tps), statistics.median(d_tps)
    census = {}
    for label, r in (("sparse", sparse), ("dense", dense)):
        try:
            census[label] = kernel_census(r)
        except Exception as e:   # a diagnostic only: never lose the measurement for it
            census[label] = {"error": str(e)}

    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = L * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * H + L * H * cfg.num_heads * cfg.head_dim
    ffn, head, pred = L * 3 * H * I, cfg.vocab_size * H, L * rank * (H + I)
    kv = L * 2 * cfg.num_kv_heads * cfg.head_dim * (CONTEXT + TOKENS)
    active = statistics.mean(fractions)
    ideal = (attn + ffn + head + kv) / (attn + active * ffn + pred + head + kv)
    del sparse, dense, w
    torch.cuda.empty_cache()
    return {"model": name, "weights": "random bf16 of the real shape", "context": CONTEXT, "tokens": TOKENS,
            "predictor_rank": rank, "active_fraction_decode": active, "active_fraction_per_layer": fractions,
            "sparse_tokens_per_s": s, "dense_tokens_per_s": d, "speedup": s / d, "bytes_ideal_speedup": ideal,
            "samples_sparse": s_tps, "samples_dense": d_tps, "step_census": census}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--out", default="benchmarks/results/cuda_decode.json")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, args.repeats))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "active_fraction_per_layer"}), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/cuda_decode.py", "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}: decode after a {CONTEXT}-token prompt, CUDA graphs, bf16")
    print(f"{'model':>14} {'active':>7} {'sparse tok/s':>12} {'dense tok/s':>11} {'speedup':>7} {'ideal':>6}")
    for r in rows:
        print(f"{r['model']:>14} {100 * r['active_fraction_decode']:>6.1f}% {r['sparse_tokens_per_s']:>12.1f} "
              f"{r['dense_tokens_per_s']:>11.1f} {r['speedup']:>7.2f} {r['bytes_ideal_speedup']:>6.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
