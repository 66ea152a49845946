"""The verifier: every built target against the PyTorch reference, then the spec's goals.

For each target (ggml test-backend-ops style: every backend, same inputs, same reference):
  1. integrity   every file listed in the target's manifest still has its recorded sha256
  2. outputs     logits come back as [1 + forced, vocab] float32, finite
  3. logits      teacher-forced over the reference's greedy continuation: max-abs, relative L2, top-1 agreement
  4. greedy      the target's own greedy tokens vs the reference's
  5. speed       decode tokens/s, sparse and dense builds interleaved in one run, median of repeats
and once for the model: perplexity of the sparse model (decode semantics: predictor gating on) vs the dense
source on each eval text, and per-layer FFN sparsity measured there.
A missed goal raises GoalMissed (exit 1) with a table of what missed; verify.json and report.md are written first.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from .cache import load_manifest, memo_digests
from .errors import GoalMissed, UserError

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def file_digests(root: Path, memo_file: Path | None = None, write_memo: bool = False) -> dict[str, str]:
    """sha256 of every file under an artifact dir (manifest.json excluded), by relative path; with a memo file,
    files whose (path, size, mtime) it records are not read again."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    return dict(zip((p.relative_to(root).as_posix() for p in files), memo_digests(files, memo_file, write_memo)))


def check_integrity(target_dir: Path) -> list[str]:
    """Files whose bytes differ from the digests recorded at lowering time, missing ones and files added since."""
    recorded = load_manifest(target_dir).get("files")
    if not recorded:
        return ["manifest.json records no file digests"]
    if not (isinstance(recorded, dict) and all(isinstance(h, str) for h in recorded.values())):
        raise UserError(f"{target_dir / 'manifest.json'}: files: expected a mapping of file names to digests")
    now = file_digests(target_dir)
    return ([f if f in now else f"{f} (missing)" for f, h in recorded.items() if now.get(f) != h]
            + [f"{f} (not built)" for f in now if f not in recorded])


def why_cannot_run(target_dir: Path, backend) -> str | None:
    """Why this artifact cannot run here: as lowered (its manifest's cannot_run) or on this machine (no GPU, ...)."""
    return load_manifest(target_dir).get("cannot_run") or backend.available()


def prompt_ids(tokenizer, prompts: list[str], bos: int | None) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=False).ids
        out.append(ids if ids else [bos if bos is not None else 0])
    return out


def rel_l2(got, want) -> float:
    """||got - want|| / ||want||, in float64."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def compare_logits(got, want) -> dict[str, float]:
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return {"max_abs": float(np.abs(got - want).max()), "rel_l2": rel_l2(got, want),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean())}


class ReferenceRunner:
    """The PyTorch reference behind the Runner interface, prefilling the way the target under test does."""

    def __init__(self, ir, prefill: str):
        from .reference import ReferenceModel
        self.model = ReferenceModel.from_ir(ir)
        self.prefill = prefill

    def _start(self, ids):
        import torch
        from .reference import KVCache
        cache = KVCache.empty(self.model.cfg.num_layers)
        if self.prefill == "batched":
            logits = self.model(torch.tensor([ids]), cache=cache)[0, -1]
        else:
            for t in ids:
                logits = self.model(torch.tensor([[t]]), cache=cache)[0, -1]
        return cache, logits

    def logits(self, prompt, forced):
        import torch
        with torch.no_grad():
            cache, last = self._start(prompt)
            rows = [last]
            for t in forced:
                rows.append(self.model(torch.tensor([[t]]), cache=cache)[0, -1])
        return torch.stack(rows).numpy()

    def generate(self, prompt, n):
        import torch
        with torch.no_grad():
            cache, last = self._start(prompt)
            out = []
            for _ in range(n):
                out.append(int(last.argmax()))
                last = self.model(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
        return out


def measure_target(runner, dense_runner, ref: ReferenceRunner, prompts: list[list[int]], steps: int,
                   speed_tokens: int, repeats: int, name: str = "") -> dict[str, Any]:
    import numpy as np
    from tqdm import tqdm
    res: dict[str, Any] = {"prompts": []}
    for ids in tqdm(prompts, desc=f"verify {name}: prompts", unit="prompt", leave=False):
        want_tokens = ref.generate(ids, steps)
        want = ref.logits(ids, want_tokens[:-1])
        got = np.asarray(runner.logits(ids, want_tokens[:-1]))
        entry = {"prompt_tokens": len(ids), "shape": list(got.shape), "expected_shape": list(want.shape)}
        entry["outputs_ok"] = bool(got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all())
        if entry["outputs_ok"]:
            entry |= compare_logits(got, want)
        gen = runner.generate(ids, steps)
        same = next((k for k, (a, b) in enumerate(zip(gen, want_tokens)) if a != b), min(len(gen), steps))
        entry["greedy_match"] = same == steps and len(gen) == steps
        entry["greedy_prefix"] = same
        res["prompts"].append(entry)
    ok = [p for p in res["prompts"] if p["outputs_ok"]]
    res["outputs_ok"] = len(ok) == len(prompts)
    res["max_abs"] = max((p["max_abs"] for p in ok), default=float("inf"))
    res["rel_l2"] = max((p["rel_l2"] for p in ok), default=float("inf"))
    res["top1"] = min((p["top1"] for p in ok), default=0.0)
    res["greedy_match"] = all(p["greedy_match"] for p in res["prompts"])
    if speed_tokens > 0 and dense_runner is not None:
        sparse_tps, dense_tps = [], []
        for _ in tqdm(range(repeats), desc=f"verify {name}: speed", unit="repeat", leave=False):
            # sparse and dense interleaved so drift and load hit both alike
            sparse_tps.append(runner.decode_tokens_per_second(prompts[0], speed_tokens))
            dense_tps.append(dense_runner.decode_tokens_per_second(prompts[0], speed_tokens))
        s, d = statistics.median(sparse_tps), statistics.median(dense_tps)
        res["speed"] = {"sparse_tokens_per_s": s, "dense_tokens_per_s": d, "speedup": s / d,
                        "samples_sparse": sparse_tps, "samples_dense": dense_tps, "tokens": speed_tokens}
        if getattr(runner, "speed_measured_on", None):
            res["speed"]["measured_on"] = runner.speed_measured_on
    return res


def measure_quality(ir, source_ir, texts: dict[str, str], tokens: int, seq_len: int) -> dict[str, Any]:
    from .evaluate import evaluate_text
    out = {}
    for name, path in texts.items():
        sparse = evaluate_text(ir, path, tokens=tokens, seq_len=seq_len, gating="predictor")
        dense = evaluate_text(source_ir, path, tokens=tokens, seq_len=seq_len, gating="exact")
        out[name] = {"perplexity": sparse["perplexity"], "dense_perplexity": dense["perplexity"],
                     "ppl_ratio": sparse["perplexity"] / dense["perplexity"], "sparsity": sparse["sparsity"],
                     "layer_sparsity": sparse["layer_sparsity"], "tokens": sparse["tokens"]}
    return out


def skipped_targets(results: dict[str, Any]) -> list[str]:
    """The targets the verifier did not run (cuda without a GPU; not built, or not from this model): reported, not
    judged."""
    return [name for name, r in results["targets"].items() if "skipped" in r]


def check_goals(goals, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal and target: value, limit, ok."""
    rows = []

    def row(goal, target, value, limit, ok):
        rows.append({"goal": goal, "target": target, "value": value, "limit": limit, "ok": bool(ok)})

    for name, r in results["targets"].items():
        if "tampered" in r:   # not when the target was not looked at (not built, or built from another model)
            row("integrity", name, ", ".join(r["tampered"]) or "intact", "intact", not r["tampered"])
        if "skipped" in r:   # cannot run here (e.g. no GPU), or not current: reported, not judged
            continue
        row("outputs", name, r["outputs_ok"], True, r["outputs_ok"])
        if goals.min_top1 is not None:
            row("min_top1", name, r["top1"], goals.min_top1, r["top1"] >= goals.min_top1)
        limit = goals.max_rel_err_by_target.get(name, goals.max_rel_err)
        if limit is not None:
            row("max_rel_err", name, r["rel_l2"], limit, r["rel_l2"] <= limit)
        limit = (goals.min_speedup or {}).get(name)
        if limit is not None:
            got = r.get("speed", {}).get("speedup")
            row("min_speedup", name, got, limit, got is not None and got >= limit)
    if goals.max_ppl_ratio is not None:
        for text, q in results.get("quality", {}).items():
            row("max_ppl_ratio", text, q["ppl_ratio"], goals.max_ppl_ratio, q["ppl_ratio"] <= goals.max_ppl_ratio)
    return rows


def environment_info() -> dict[str, Any]:
    import onnxruntime
    import torch
    from . import __version__
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "tscompile": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def verify_build(build_dir: Path, spec, targets: list[str] | None = None,
                 not_verified: dict[str, str] | None = None) -> dict[str, Any]:
    from tokenizers import Tokenizer
    from . import registry
    from .ir import ModelIR
    from .report import write_report
    from .sources import load_source

    build_dir = Path(build_dir)
    model_dir = build_dir / "model"
    if not model_dir.is_dir():
        raise UserError(f"{build_dir}: no model/ checkpoint (was it built?)")
    names = list(spec.targets) if targets is None else targets     # []: no target, only the model-level checks
    missing = [t for t in names if not (build_dir / t / "manifest.json").exists()]
    if missing:
        raise UserError(f"{build_dir}: target(s) {', '.join(missing)} not built (no manifest.json)")
    ir = ModelIR.load(model_dir)
    if ir.tokenizer_json is None:
        raise UserError(f"{model_dir}: no tokenizer.json; the verifier needs one to encode prompts")
    v = spec.verify
    prompts = list(v.prompts) or DEFAULT_PROMPTS
    ids = prompt_ids(Tokenizer.from_str(ir.tokenizer_json), prompts, ir.config.bos_token_id)
    t0 = time.time()
    results: dict[str, Any] = {"build_dir": str(build_dir), "spec": spec.name, "environment": environment_info(),
                               "targets": {t: {"skipped": why} for t, why in (not_verified or {}).items()}}
    refs: dict[str, ReferenceRunner] = {}
    for name in names:
        tdir = build_dir / name
        backend = registry.backend(name)
        tampered = check_integrity(tdir)
        why = why_cannot_run(tdir, backend)
        if why:
            results["targets"][name] = {"skipped": why, "tampered": tampered}
            continue
        if tampered:   # a tampered artifact is never run: its bytes are not what was built
            results["targets"][name] = {"tampered": tampered, "outputs_ok": False, "top1": 0.0,
                                        "rel_l2": float("inf"), "max_abs": float("inf"), "greedy_match": False}
            continue
        runner = backend.load(tdir)
        dense = backend.load(tdir, dense=True) if v.speed_tokens > 0 else None
        ref = refs.setdefault(runner.prefill, ReferenceRunner(ir, runner.prefill))
        r = measure_target(runner, dense, ref, ids, v.steps, v.speed_tokens, v.repeats, name)
        r["tampered"] = tampered
        results["targets"][name] = r
    if spec.data is not None and spec.data.eval is not None and spec.data.eval.texts:
        ev = spec.data.eval
        results["quality"] = measure_quality(ir, load_source(spec.source), ev.texts, ev.tokens, ev.seq_len)
    results["annotations"] = [layer.to_json() for layer in ir.layers]
    results["goals"] = check_goals(v.goals, results)
    results["ok"] = all(g["ok"] for g in results["goals"])
    results["seconds"] = time.time() - t0
    write_report(build_dir, results)
    missed = [g for g in results["goals"] if not g["ok"]]
    if missed:
        raise GoalMissed(goal_table(missed))
    return results


def goal_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'goal':<14} {'target':<10} {'value':>12} {'limit':>10}"]
    for g in rows:
        val = g["value"]
        val = f"{val:.4g}" if isinstance(val, float) else str(val)
        lines.append(f"  {g['goal']:<14} {g['target']:<10} {val:>12} {str(g['limit']):>10}")
    return "\n".join(lines)
