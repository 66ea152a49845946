"""Cost measurements of the generated runtime: qemu-plugin instruction counts and host wall time.

Used by benchmarks/arm64_decode.py and by the instruction-count floor test. Counts are deterministic
for a given compiler (pinned: Debian's aarch64-linux-gnu-gcc 12) and input; per-call figures come
from the difference of two runs (N2 and N1 calls), so setup and loading cancel out exactly.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tscompile.errors import UserError
from tscompile.ir import ArchConfig, LayerSparsity, ModelIR, Predictor, Weights

from . import qemu_plugin
from .build import aarch64_job, cross_compiler, host_compiler, host_job, run_jobs
from .sources import render_sources

FFN_BENCH_SOURCE = Path(__file__).parent / "tools" / "ffn_bench.c"
NOISE = re.compile(r"^(\?|.*printf.*|.*mpn_.*|hack_digit|__memcpy.*|_IO_.*|.*_fp_.*)$")  # float printing


def ffn_bench_ir(hidden: int, inter: int, rank: int, threshold: float) -> ModelIR:
    """A one-layer model holding one predictor-gated SwiGLU FFN (only its shape matters to the bench)."""
    heads = max(1, hidden // 64)
    cfg = ArchConfig(family="llama", vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_layers=1,
                     num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads)
    layer = LayerSparsity(activation="swiglu", mode="predictor", predictor=Predictor(rank=rank, threshold=threshold))
    return ModelIR(cfg, Weights(), None, [layer], {"source": f"ffn-bench {hidden}x{inter}"})


def build_ffn_bench(outdir: Path, hidden: int = 576, inter: int = 1536, rank: int = 72,
                    threshold: float = 1.2816, dtype: str = "float32") -> dict[str, Path]:
    """Compiles tools/ffn_bench.c with the runtime for that FFN shape: {"aarch64": path, "host": path}."""
    outdir.mkdir(parents=True, exist_ok=True)
    src = outdir / "src"
    src.mkdir(exist_ok=True)
    for name, text in render_sources(ffn_bench_ir(hidden, inter, rank, threshold), dtype).items():
        (src / name).write_text(text)
    cc, hcc = cross_compiler(), host_compiler()
    if cc is None or hcc is None:
        raise UserError("ffn bench: needs aarch64-linux-gnu-gcc and a host gcc")
    built = {"aarch64": outdir / "ffn_bench", "host": outdir / "ffn_bench-host"}
    run_jobs([aarch64_job(cc, src, built["aarch64"], (FFN_BENCH_SOURCE,), skip=("main.c",)),
              host_job(hcc, src, built["host"], extra_sources=(FFN_BENCH_SOURCE,), skip=("main.c",))])
    return built


def per_call_counts(command: list[str], n1: int, n2: int, arg_index: int,
                    mem_prefixes: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """{symbol: (instructions, loaded bytes) per call}: counts(n2) - counts(n1), divided by n2 - n1.

    command[arg_index] is replaced by the call (or step) count. Float-printing symbols are dropped.
    """
    runs = []
    for n in (n1, n2):
        cmd = list(command)
        cmd[arg_index] = str(n)
        runs.append(qemu_plugin.count(cmd, mem_prefixes))
    out = {}
    for name in set(runs[0]) | set(runs[1]):
        if NOISE.match(name):
            continue
        a, b = runs[0].get(name, (0, 0)), runs[1].get(name, (0, 0))
        if a != b:
            out[name] = ((b[0] - a[0]) / (n2 - n1), (b[1] - a[1]) / (n2 - n1))
    return out


def ffn_call_costs(binary: Path, mode: str, n1: int = 2, n2: int = 6) -> dict:
    """Instructions and loaded bytes of one ffn_forward() call, with the predictor's share split out."""
    per = per_call_counts([str(binary), mode, "0"], n1, n2, 2, mem_prefixes=("*",))
    per = {k: v for k, v in per.items() if not k.startswith("bench_") and k != "main"}  # the harness
    predictor = [k for k in per if k in ("matvec_f32", "predict_active") or k.startswith("predict_active")]
    total_i = sum(v[0] for v in per.values())
    total_b = sum(v[1] for v in per.values())
    pred_i = sum(per[k][0] for k in predictor) if mode == "sparse" else 0.0
    pred_b = sum(per[k][1] for k in predictor) if mode == "sparse" else 0.0
    return {"instructions": total_i, "loaded_bytes": total_b, "predictor_instructions": pred_i,
            "predictor_loaded_bytes": pred_b, "instructions_without_predictor": total_i - pred_i,
            "loaded_bytes_without_predictor": total_b - pred_b,
            "symbols": {k: round(v[0], 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])[:12]}}


def host_ffn_timing(binary: Path, mode: str, calls: int = 400) -> dict:
    res = subprocess.run([str(binary), mode, str(calls)], capture_output=True, text=True, check=True)
    m = re.search(r"computed ([0-9.]+) us_per_call ([0-9.]+)", res.stdout)
    return {"computed_fraction": float(m.group(1)), "us_per_call": float(m.group(2))}
