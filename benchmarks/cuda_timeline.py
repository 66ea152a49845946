"""Where one decode step's time goes, block by block, on the GPU.

    python benchmarks/cuda_timeline.py [--out benchmarks/results/cuda_timeline.json]

The 7B-shaped model of cuda_decode.py (mistral-7b: 10% active, rank-256 predictors, context 512) runs one CUDA-graph
replay of its decode step, sparse and dense runners, with programmatic dependent launch as in the benchmark. Every
block of every kernel records when it started, when its wait for the previous kernel (griddepcontrol.wait) returned
and when it ended (%globaltimer, thread 0); sparse_ffn and decode_attention also record marks inside (MARKS). The
hooks are added to the generated source by text substitution at anchors that must each occur once, so the tool
fails loudly when the templates move; the kernels themselves are unchanged.

Printed per kernel of a layer, medians over layers 1-30 (us): `after wait` = its last block's end minus its first
block's wait return, `gap` = its first wait return minus the previous kernel's last block end (what a dependent
launch boundary costs), `early` = how long before the previous kernel ended its first block was already resident;
and for the marked kernels the medians over blocks of each mark, after the block's wait returned. The dense
runner's cuBLAS down projection is not traced: the gap before its q/k/v GEMV includes it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_decode import MODELS, calibrated_runners, random_prompt, random_weights  # noqa: E402
from tscompile.backends.cuda.kernels import KernelShape, compile_library, device_arch, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary  # noqa: E402
from tscompile.cache import write_text_atomic  # noqa: E402

CAP = 262144   # block records kept per replay
HOOKS = r'''
// ---- timeline hooks (benchmarks/cuda_timeline.py) ----
__device__ unsigned long long tsc_trace[12 * 262144];   // per block: tag | block << 8, start, wait, end, 8 marks
__device__ unsigned tsc_trace_n;
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long* trace_times() { __shared__ unsigned long long t[9]; return t; }
#define TRACE_MARK(i) if (threadIdx.x == 0) trace_times()[1 + (i)] = now_ns();
struct TraceBlock {
    int tag;
    unsigned long long start;
    __device__ TraceBlock(int t) : tag(t), start(now_ns()) {
        if (threadIdx.x == 0) for (int i = 0; i < 9; ++i) trace_times()[i] = 0;
    }
    __device__ ~TraceBlock() {
        if (threadIdx.x != 0) return;
        const unsigned i = atomicAdd(&tsc_trace_n, 1);
        if (i >= 262144) return;
        unsigned long long* r = tsc_trace + 12ull * i;
        r[0] = tag | (unsigned long long)(blockIdx.x + blockIdx.y * gridDim.x) << 8;
        r[1] = start; r[2] = trace_times()[0]; r[3] = now_ns();
        for (int k = 0; k < 8; ++k) r[4 + k] = trace_times()[1 + k];
    }
};
extern "C" int tsc_trace_read(unsigned long long* out, int max) {
    unsigned n = 0, zero = 0;
    cudaMemcpyFromSymbol(&n, tsc_trace_n, sizeof n);
    n = n < (unsigned)max ? n : (unsigned)max;
    cudaMemcpyFromSymbol(out, tsc_trace, 96ull * n);
    cudaMemcpyToSymbol(tsc_trace_n, &zero, sizeof zero);
    return (int)n;
}
'''
KERNELS = ["gemv", "decode_attention", "predict_hidden", "predict_active", "sparse_ffn"]
MARKS = {  # kernel: [(anchor, 1 = mark after it / 0 = before it, what the mark means)]
    "sparse_ffn": [
        ("if (threadIdx.x < cn) ids[threadIdx.x] = row_of(c0 + threadIdx.x);\n        __syncthreads();", 1,
         "ids read"),
        ("        __syncthreads();\n        for (int t = threadIdx.x; t < cn * B; t += THREADS) {", 0,
         "gate/up rows done"),
        ("        // down: the partial y lives in registers", 0, "h known"),
        ("        cp_async_wait<0>();\n", 1, "down rows done"),
        ("    grid_barrier(barrier);\n", 1, "grid barrier passed")],
    "decode_attention": [
        ("    if (last >= first && (last - first) % nb == 0)", 0, "qkv read, roped"),
        ("    if (pg < POS_GROUPS)\n#pragma unroll\n        for (int r = 0; r < GROUP; ++r)", 0, "chunks done"),
        ("    const int per = (GROUP * HEAD_DIM + nb - 1) / nb;", 0, "partials summed, cluster synced"),
        ("    cluster_sync();   // no block exits", 0, "merged, written")],
}


def with_hooks(src: str) -> str:
    """The generated source with the timeline hooks (module docstring)."""
    def once(anchor, replacement):
        assert src.count(anchor) == 1, f"timeline anchor not found once: {anchor!r}"
        return src.replace(anchor, replacement)
    anchor = "// Programmatic dependent launch (sm_90)"
    src = once(anchor, HOOKS + "\n" + anchor)
    wait = 'asm volatile("griddepcontrol.wait;" ::: "memory");'
    src = once(wait, wait + "\n    if (threadIdx.x == 0) trace_times()[0] = now_ns();")
    for tag, name in enumerate(KERNELS):
        m = re.search(r"__global__ void __launch_bounds__\([^)]*\) " + name + r"\(", src)
        body = src.index("\n{\n", m.end()) + 3
        src = src[:body] + f"    TraceBlock trace_block({tag});\n" + src[body:]
    for marks in MARKS.values():
        for k, (anchor, after, _) in enumerate(marks):
            mark = f"    TRACE_MARK({k})\n"
            src = once(anchor, anchor + mark if after else mark + anchor)
    return src


def step_records(runner, lib) -> list[tuple]:
    """(kernel, block, start, wait, end, marks) of every block of one replay of the runner's decode step."""
    buf = (ctypes.c_ulonglong * (12 * CAP))()
    lib.lib.tsc_trace_read.argtypes = [ctypes.c_void_p, ctypes.c_int]
    torch.cuda.synchronize()
    lib.lib.tsc_trace_read(buf, CAP)   # drop what the prefill and capture recorded
    runner.graph.replay()
    torch.cuda.synchronize()
    n = lib.lib.tsc_trace_read(buf, CAP)
    rows = [buf[12 * i: 12 * i + 12] for i in range(n)]
    return [(KERNELS[r[0] & 0xff], r[0] >> 8, r[1], r[2], r[3], r[4:]) for r in rows]


def launches(records: list[tuple]) -> list[dict]:
    """The records grouped into kernel launches, in start order (a launch ends where a block id repeats)."""
    out, current = [], {}
    for rec in sorted(records, key=lambda r: r[2]):
        launch = current.get(rec[0])
        if launch is None or rec[1] in launch["blocks"]:
            launch = current[rec[0]] = {"kernel": rec[0], "blocks": set(), "records": []}
            out.append(launch)
        launch["blocks"].add(rec[1])
        launch["records"].append(rec)
    for launch in out:
        rs = launch.pop("records")
        launch["blocks"] = len(rs)
        launch["first_start"], launch["first_wait"] = min(r[2] for r in rs), min(r[3] for r in rs)
        launch["last_end"] = max(r[4] for r in rs)
        marks = MARKS.get(launch["kernel"], [])
        launch["marks_us"] = [statistics.median([(r[5][k] - r[3]) / 1e3 for r in rs if r[5][k]] or [float("nan")])
                              for k in range(len(marks))]   # a block without rows never reaches sparse_ffn's marks
    return out


def layer_table(ls: list[dict], layers: int) -> list[dict]:
    """Per kernel of a layer: medians over layers 1 .. layers - 2 of its timings (module docstring)."""
    per = (len(ls) - 1) // layers   # the step ends with the LM head
    rows = []
    for k in range(per):
        at = [(ls[i * per + k - 1], ls[i * per + k]) for i in range(1, layers - 1)]
        row = {"kernel": at[0][1]["kernel"], "blocks": at[0][1]["blocks"],
               "after_wait_us": statistics.median((b["last_end"] - b["first_wait"]) / 1e3 for _, b in at),
               "gap_us": statistics.median((b["first_wait"] - a["last_end"]) / 1e3 for a, b in at),
               "early_us": statistics.median((a["last_end"] - b["first_start"]) / 1e3 for a, b in at)}
        if at[0][1]["marks_us"]:
            row["marks_us"] = {what: round(statistics.median(b["marks_us"][j] for _, b in at), 2)
                               for j, (_, _, what) in enumerate(MARKS[row["kernel"]])}
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cuda_timeline.json")
    args = ap.parse_args()
    cfg, rank = MODELS["mistral-7b"]
    shape = KernelShape("mistral-7b", cfg.hidden_size, cfg.intermediate_size, "bfloat16", ("swiglu",), rank,
                        batches=(1,), heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    with tempfile.TemporaryDirectory() as tmp:
        lib = KernelLibrary(compile_library(with_hooks(render_source(shape)), device_arch(), Path(tmp)))
    w = random_weights(cfg, rank)
    prompt = random_prompt(cfg)
    result = {"device": torch.cuda.get_device_name(), "command": " ".join(["python", *sys.argv]),
              "model": "mistral-7b (cuda_decode.py)", "runners": {}}
    for label, runner in zip(("sparse", "dense"), calibrated_runners(cfg, lib, w, prompt)):
        runner.generate(prompt, 2)   # prefill, capture the step's graph
        ls = launches(step_records(runner, lib))
        rows = layer_table(ls, cfg.num_layers)
        step = (ls[-1]["last_end"] - ls[0]["first_start"]) / 1e3
        result["runners"][label] = {"step_us": step, "layer": rows}
        print(f"\n{label}: step {step:.0f} us (traced), per layer (medians over layers 1-30, us):")
        print(f"{'kernel':>18} {'blocks':>6} {'after wait':>10} {'gap':>5} {'early':>6}  marks after the wait")
        for r in rows:
            marks = ", ".join(f"{k} {v}" for k, v in r.get("marks_us", {}).items())
            print(f"{r['kernel']:>18} {r['blocks']:>6} {r['after_wait_us']:>10.1f} {r['gap_us']:>5.1f} "
                  f"{r['early_us']:>6.1f}  {marks}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
