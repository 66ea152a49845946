"""Lowering a ModelIR to the arm64 artifact: C sources, build files, weights.bin, tokenizer.bin, binaries."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tscompile.errors import UserError
from tscompile.ir import ModelIR

from .blob import BLOB_VERSION, write_weights_blob
from .build import android_ndk, build_binaries, cross_compiler
from .config import Arm64Config
from .sources import render_build_files, render_sources
from .tokenizer_bin import write_tokenizer_bin

LOGITS_ROWS = ("--dump-logits: float32 [rows, vocab]; with --force-ids F: 1 + len(F) rows (after the prompt, "
               "then after each forced token); otherwise one row per generated token (the logits it was "
               "sampled from)")


def ffn_manifest(ann) -> dict:
    return {"activation": ann.activation, "mode": ann.mode, "threshold": ann.threshold,
            "predictor_rank": ann.predictor.rank if ann.predictor else 0}


def write_sources(ir: ModelIR, cfg: Arm64Config, outdir: Path) -> None:
    """src/*.c|h, CMakeLists.txt and toolchain-aarch64.cmake."""
    src = outdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, text in render_sources(ir, cfg.dtype).items():
        (src / name).write_text(text)
    for name, text in render_build_files(android_ndk(), cfg.qemu_cpu).items():
        (outdir / name).write_text(text)


def lower_arm64(ir: ModelIR, cfg: Arm64Config, outdir: Path, ctx=None) -> dict:
    """Writes outdir (arm64/) and returns its manifest (also written as manifest.json)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_sources(ir, cfg, outdir)
    write_weights_blob(ir, cfg.dtype, outdir / "weights.bin")
    tokenizer_note = None
    if ir.tokenizer_json:
        try:
            write_tokenizer_bin(ir.tokenizer_json, outdir / "tokenizer.bin")
        except UserError as e:        # the model still runs from token ids
            tokenizer_note = str(e)
    else:
        tokenizer_note = "the model has no tokenizer"
    binaries = build_binaries(outdir) if cfg.compile else {}
    if cfg.compile and "tsrun" not in binaries:
        binaries["tsrun"] = {"skipped": "no aarch64 compiler "
                                        "(apt-get install gcc-aarch64-linux-gnu, or set ANDROID_NDK)"}
    c = ir.config
    manifest = {
        "backend": "arm64",
        **({} if cfg.compile else {"cannot_run": "lowered with compile: false (sources only, no binaries)"}),
        "blob_version": BLOB_VERSION,
        "dtype": cfg.dtype,
        "dtypes": {"matrices": cfg.dtype, "embedding": cfg.dtype, "norms": "float32", "biases": "float32",
                   "predictors": "float32", "router": "float32", "rope_inv_freq": "float32", "kv_cache": "float32",
                   "activations": "float32 (fp16 copies of matvec inputs on the fp16-arithmetic path)"},
        "threads": cfg.threads,
        "qemu_cpu": cfg.qemu_cpu,
        "dims": {"vocab": c.vocab_size, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
                 "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                 "head_dim": c.head_dim, "sliding_window": c.sliding_window,
                 "attention_bias": c.attention_bias, "tied_embeddings": c.tie_word_embeddings,
                 "experts": c.num_experts, "top_k": c.num_experts_per_tok},
        "layers": [ffn_manifest(a) if a.experts is None else {"experts": [ffn_manifest(e) for e in a.experts]}
                   for a in ir.layers],
        "isa": {"required": ["armv8-a", "asimd"],
                "optional": {"asimdhp": "fp16 arithmetic kernels (float16 weights), chosen at run time",
                             "crc32": "faster weight checksums"}},
        "binaries": binaries,
        "tokenizer": "tokenizer.bin" if tokenizer_note is None else None,
        "tokenizer_note": tokenizer_note,
        "logits": LOGITS_ROWS,
        "cross_compiler": (cross_compiler() or [None])[0],
        "lower_seconds": round(time.perf_counter() - t0, 3),
    }
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
