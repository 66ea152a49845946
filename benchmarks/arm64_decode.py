"""arm64 runtime: dense vs sparse cost of one FFN call and one decode step at SmolLM2-135M's shape.

    python benchmarks/arm64_decode.py [--out benchmarks/results/arm64_decode.json] [--keep DIR]

Deterministic proxy: instructions and loaded bytes counted by our qemu TCG plugin (aarch64 build, gcc pinned:
Debian's aarch64-linux-gnu-gcc 12, -O2), per call/step from the difference of two runs; the FFN call also with
fp16 weights and fp16 arithmetic (cortex-a76). Plus x86_64 host wall
time of the same C (scalar kernels), measured side by side. Random weights; predictors (rank 72 = hidden/8) whose
threshold leaves ~10% of the neurons active; every call gets a new input so the active set rotates.
Never qemu wall time: emulation speed says nothing about a phone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 576, 1536, 30, 9, 3, 49152
RANK, THRESHOLD = 72, 1.2816          # score ~ N(0, 1): P(score >= 1.2816) = 0.10


def decode_model_ir(seed: int = 0):
    """SmolLM2-135M's shape with random weights and a random predictor per layer (~10% of neurons pass)."""
    from tscompile.tiny import add_random_predictors, make_tiny_ir
    ir = make_tiny_ir("llama", "swiglu", seed, layers=LAYERS, hidden=HIDDEN, intermediate=INTER, heads=HEADS,
                      kv_heads=KV_HEADS, vocab=VOCAB)
    # score = fc2 relu(fc1 x) ~ N(0, 1/2) for unit-RMS x: P(score >= 1.2816 / sqrt 2) = 0.10
    return add_random_predictors(ir, rank=RANK, seed=seed + 1, threshold=THRESHOLD / 2 ** 0.5)


def decode_step_costs(outdir: Path, dense: bool) -> dict:
    """Instructions and loaded bytes of one decode step (steps 3 vs 1 after a one-token prompt)."""
    from tscompile.backends.arm64 import bench
    cmd = [str(outdir / "bin" / "tsrun"), str(outdir / "weights.bin"), "--prompt-ids", "1", "--steps", "0",
           "--print-ids", "--ignore-eos"] + (["--dense"] if dense else [])
    per = bench.per_call_counts(cmd, 1, 3, 5, mem_prefixes=("*",))
    ffn = {k: v for k, v in per.items() if k in ("ffn_forward", "predict_active", "rows_dot_f32", "rows_axpy_f32")}
    return {"instructions": sum(v[0] for v in per.values()), "loaded_bytes": sum(v[1] for v in per.values()),
            "symbols": {k: round(v[0]) for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])[:10]},
            "ffn_gather_kernel_instructions": sum(v[0] for v in ffn.values())}


def host_decode_tokens_per_second(outdir: Path, dense: bool, steps: int = 9, repeats: int = 3) -> dict:
    rates, computed = [], None
    for _ in range(repeats):
        res = subprocess.run([str(outdir / "bin" / "tsrun-host"), str(outdir / "weights.bin"), "--prompt-ids", "1",
                              "--steps", str(steps + 1), "--print-ids", "--ignore-eos",
                              *(["--dense"] if dense else [])],
                             check=True, capture_output=True, text=True)
        m = re.search(r"decode (\d+) tokens in ([0-9.]+) s.*computed ([0-9.]+)%", res.stderr)
        rates.append(int(m.group(1)) / float(m.group(2)))
        computed = float(m.group(3))
    return {"tokens_per_second_best": max(rates), "tokens_per_second_all": rates, "ffn_neurons_computed_pct": computed}


def main() -> int:
    from tscompile.cache import compiler_version, write_text_atomic
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arm64_decode.json"))
    ap.add_argument("--keep", help="directory for the lowered model and binaries (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tscompile.backends.arm64 import BACKEND, bench, qemu_plugin
    from tscompile.backends.arm64.build import cross_compiler, host_compiler

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="arm64-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict = {
        "benchmark": "arm64_decode",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"counts": "qemu-aarch64 7.2 TCG plugin (tools/insn_count.c), -cpu cortex-a76, guest single-threaded",
                   "host": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores), "
                           "scalar kernels, 1 thread".strip()},
        "compilers": {"aarch64": compiler_version(cross_compiler()), "host": compiler_version(host_compiler())},
        "shape": {"hidden": HIDDEN, "intermediate": INTER, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                  "vocab": VOCAB, "dtype": "float32", "predictor_rank": RANK, "target_inactive": 0.9},
    }
    qemu_plugin.build_plugin()
    steps = tqdm(total=7, desc="arm64 bench", file=sys.stderr)

    # ---- one FFN call (ffn_bench harness) --------------------------------------------------------
    ffn_bin = bench.build_ffn_bench(work / "ffn_bench", HIDDEN, INTER, RANK, THRESHOLD)
    steps.update()
    dense = bench.ffn_call_costs(ffn_bin["aarch64"], "dense")
    sparse = bench.ffn_call_costs(ffn_bin["aarch64"], "sparse")
    host_dense = bench.host_ffn_timing(ffn_bin["host"], "dense")
    host_sparse = bench.host_ffn_timing(ffn_bin["host"], "sparse")
    steps.update()
    result["ffn_call"] = {
        "dense": dense, "sparse": sparse,
        "sparse_computed_fraction": host_sparse["computed_fraction"],
        "instructions_ratio_without_predictor": dense["instructions"] / sparse["instructions_without_predictor"],
        "instructions_ratio_with_predictor": dense["instructions"] / sparse["instructions"],
        "loaded_bytes_ratio_without_predictor": dense["loaded_bytes"] / sparse["loaded_bytes_without_predictor"],
        "loaded_bytes_ratio_with_predictor": dense["loaded_bytes"] / sparse["loaded_bytes"],
        "host_us_per_call": {"dense": host_dense["us_per_call"], "sparse": host_sparse["us_per_call"],
                             "ratio": host_dense["us_per_call"] / host_sparse["us_per_call"]},
    }

    # fp16 weights on a CPU with fp16 arithmetic (cortex-a76): the kernels a phone would run
    ffn16 = bench.build_ffn_bench(work / "ffn_bench_f16", HIDDEN, INTER, RANK, THRESHOLD, dtype="float16")
    dense16 = bench.ffn_call_costs(ffn16["aarch64"], "dense")
    sparse16 = bench.ffn_call_costs(ffn16["aarch64"], "sparse")
    result["ffn_call_float16"] = {
        "dense": dense16, "sparse": sparse16,
        "instructions_ratio_without_predictor": dense16["instructions"] / sparse16["instructions_without_predictor"],
        "instructions_ratio_with_predictor": dense16["instructions"] / sparse16["instructions"],
        "loaded_bytes_ratio_without_predictor": dense16["loaded_bytes"] / sparse16["loaded_bytes_without_predictor"],
        "dense_instructions_vs_float32": dense16["instructions"] / dense["instructions"],
    }

    # ---- one decode step of the whole model (tsrun) ------------------------------------------------
    ir = decode_model_ir()
    model_dir = work / "model" / "arm64"
    BACKEND.lower(ir, BACKEND.config(dtype="float32"), model_dir, None)
    del ir
    steps.update()
    step_dense = decode_step_costs(model_dir, dense=True)
    steps.update()
    step_sparse = decode_step_costs(model_dir, dense=False)
    steps.update()
    tps_dense = host_decode_tokens_per_second(model_dir, dense=True)
    steps.update()
    tps_sparse = host_decode_tokens_per_second(model_dir, dense=False)
    steps.update()
    steps.close()
    result["decode_step"] = {
        "dense": step_dense, "sparse": step_sparse,
        "instructions_ratio": step_dense["instructions"] / step_sparse["instructions"],
        # predictors share matvec_f32 with attention in tsrun, so their cost comes from the FFN harness
        # (input-independent: fixed-size products), times the layer count
        "instructions_without_predictor_estimate":
            step_sparse["instructions"] - LAYERS * sparse["predictor_instructions"],
        "instructions_ratio_without_predictor_estimate":
            step_dense["instructions"] / (step_sparse["instructions"] - LAYERS * sparse["predictor_instructions"]),
        "loaded_bytes_ratio": step_dense["loaded_bytes"] / step_sparse["loaded_bytes"],
        "host_tokens_per_second": {"dense": tps_dense, "sparse": tps_sparse,
                                   "ratio": tps_sparse["tokens_per_second_best"] / tps_dense["tokens_per_second_best"]},
    }
    result["targets"] = {"decode_step_instructions_ratio >= 1.8": result["decode_step"]["instructions_ratio"] >= 1.8,
                         "ffn_call_instructions_ratio_without_predictor >= 8":
                             result["ffn_call"]["instructions_ratio_without_predictor"] >= 8.0}
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    f, d = result["ffn_call"], result["decode_step"]
    print(f"FFN call 576x1536 ({f['sparse_computed_fraction']:.1%} computed): instructions dense/sparse "
          f"{f['instructions_ratio_without_predictor']:.2f}x without predictor, "
          f"{f['instructions_ratio_with_predictor']:.2f}x with; host time {f['host_us_per_call']['ratio']:.2f}x")
    h = result["ffn_call_float16"]
    print(f"FFN call, fp16 weights + fp16 arithmetic: dense/sparse {h['instructions_ratio_without_predictor']:.2f}x "
          f"without predictor, {h['instructions_ratio_with_predictor']:.2f}x with; dense fp16/fp32 instructions "
          f"{h['dense_instructions_vs_float32']:.2f}")
    print(f"decode step (30 layers + lm_head): instructions dense/sparse {d['instructions_ratio']:.2f}x "
          f"({d['instructions_ratio_without_predictor_estimate']:.2f}x without predictors, estimated), "
          f"loaded bytes {d['loaded_bytes_ratio']:.2f}x; host tok/s sparse/dense "
          f"{d['host_tokens_per_second']['ratio']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
