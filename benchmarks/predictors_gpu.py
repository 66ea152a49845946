"""Predictors on the fine-tuned dReLU SmolLM2 (specs/smollm2.yaml: drelu -> relufy -> threshold) on a lent GPU.

benchmarks/relufy_gpu.py's device sequence brings the model and trains it (its `run` keeps the tuned model in
the stash); in the same warm machine this script then runs

    python benchmarks/predictors_gpu.py run [--tokens 262144] [--recalls 0.97 0.95] [--gap 0.03]

which applies the spec's threshold step, runs the predictors pass once per target recall (rank auto, mode
predictor so that every FFN is gated and measured) on calibration sequences cut from the training windows,
and measures per FFN: true and predicted sparsity, recall and precision on the pass's test split and on the
held-out windows, predictor bytes, which mode `mode: auto` would pick, and held-out perplexity with predictor
gating on every token vs exact gating. One JSON (rewritten after each recall) and a per-layer PNG per recall
land in $OUT.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
from relufy_gpu import SPEC, STASH, TUNED, context, out_dir, relufy_config


def calibration_windows(train: np.ndarray, tokens: int, seq_len: int, seed: int):
    """About `tokens` tokens of calibration sequences [n, seq_len], cut from randomly chosen training windows."""
    import torch
    per = (train.shape[1] - 1) // seq_len          # sequences per window (a window holds seq_len + 1 tokens)
    pick = np.random.default_rng(seed).choice(len(train), -(-tokens // (per * seq_len)), replace=False)
    return torch.from_numpy(train[np.sort(pick), :per * seq_len].astype(np.int64)).reshape(-1, seq_len)


def heldout_metrics(ir, windows: dict[str, np.ndarray], device: str, n_windows: int) -> list[dict]:
    """Per FFN: recall, precision, predicted and true sparsity of its predictor on held-out windows."""
    import torch
    from tscompile.passes.predictors import TrainedPredictor, collect_samples, predictor_metrics

    from tscompile.ir import predictor_names
    from tscompile.reference import ReferenceModel
    model = ReferenceModel.from_ir(ir, torch.float32, device)
    units = list(ir.ffn_units())
    ids = torch.cat([torch.from_numpy(w[:n_windows, :-1].astype(np.int64)) for w in windows.values()]).to(device)
    samples = collect_samples(model, ids, list(range(len(units))), ids.numel(), batch_seqs=16,
                              desc="held-out samples")
    out = []
    for u, (layer, expert, ann) in enumerate(units):
        f1, f2 = predictor_names(layer, expert)
        pred = TrainedPredictor(ir.weights[f1].to(device), ir.weights[f2].to(device), ann.predictor.relu,
                                ann.predictor.threshold, 0.0, 0)
        out.append(predictor_metrics(pred, samples.pop(u), pred.threshold))
    return out


def auto_mode(stats: dict, gap: float) -> tuple[str, str]:
    """The mode `mode: auto` would give this FFN, from the validation figures the pass decides on."""
    from tscompile.passes.predictors import choose_mode
    val = stats["val"]
    return choose_mode("auto", val["bytes_exact"], val["bytes_predictor"],
                       val["true_sparsity"] - val["predicted_sparsity"], gap)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def run(args) -> None:
    from tscompile.cache import write_text_atomic
    import torch
    from tscompile.passes.predictors import (
        PredictorsConfig,
        fit_predictors,
        gated_perplexity,
        plot_predictors,
    )
    from tscompile.passes.relufy import training_data
    from tscompile.passes.threshold import apply_threshold

    from tscompile.errors import UserError
    from tscompile.ir import ModelIR
    from tscompile.spec import load_spec
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    log = logging.getLogger("tscompile")
    if not (TUNED / "config.json").exists():
        raise UserError(f"{TUNED}: no fine-tuned model; run `python benchmarks/relufy_gpu.py run` to the end first")
    spec = load_spec(SPEC)
    dev, out = args.device, out_dir()
    work = STASH / "work"
    thr_step = next(s for s in spec.pipeline if s.name == "threshold")
    ir = apply_threshold(ModelIR.load(TUNED), thr_step.config, context(spec, work, dev))
    train, heldout = training_data(ir, relufy_config(spec), context(spec, work, dev))   # the run's windows
    calib = calibration_windows(train.windows, args.tokens, args.seq_len, spec.seed)
    results = {"command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name()
               if dev.startswith("cuda") else "cpu", "torch": torch.__version__,
               "model": f"{SPEC.name}: drelu -> relufy (relufy_gpu.py) -> threshold {thr_step.config.model_dump()}",
               "calibration": {"tokens": int(calib.numel()), "seq_len": args.seq_len,
                               "text": "training windows of the relufy run (random, seeded)"},
               "heldout_windows": {k: list(v.shape) for k, v in heldout.items()}, "runs": {}}
    for recall in args.recalls:
        cfg = PredictorsConfig(rank="auto", target_recall=recall, max_sparsity_gap=args.gap, mode="predictor",
                               eval_tokens=0)
        t0 = time.time()
        gated = fit_predictors(ir, cfg, calib, dev, log, spec.seed)
        fit_s = time.time() - t0
        ppl = {name: gated_perplexity(gated, torch.from_numpy(w.astype(np.int64)), dev, batch_seqs=16)
               for name, w in heldout.items()}
        held = heldout_metrics(gated, heldout, dev, args.heldout_windows)
        ffns = []
        for (layer, _, ann), h in zip(gated.ffn_units(), held):
            mode, why = auto_mode(ann.stats, args.gap)
            ffns.append({"layer": layer, **ann.stats, "heldout": h, "auto_mode": mode, "auto_reason": why})
        summary = dict(gated.meta["predictors"], pass_seconds=round(fit_s, 1), config=cfg.model_dump())
        summary |= {
            "mean_heldout_recall": _mean(h["recall"] for h in held),
            "mean_heldout_predicted_sparsity": _mean(h["predicted_sparsity"] for h in held),
            "mean_heldout_true_sparsity": _mean(h["true_sparsity"] for h in held),
            "max_gap": max(f["true_sparsity"] - f["predicted_sparsity"] for f in ffns),
            "auto_predictor_ffns": sum(f["auto_mode"] == "predictor" for f in ffns),
            "held_out_perplexity": ppl}
        results["runs"][f"{recall:g}"] = {"summary": summary, "ffns": ffns}
        png = out / f"predictors_relufy_recall{recall:g}.png"
        plot_predictors(gated, png)
        write_text_atomic(out / "predictors_smollm2_relufy_gpu.json", json.dumps(results, indent=1, default=str))
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--tokens", type=int, default=262144, help="calibration tokens for the predictors pass")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (the spec's data.calib)")
    p.add_argument("--recalls", type=float, nargs="+", default=[0.97, 0.95], help="target recalls, one pass each")
    p.add_argument("--gap", type=float, default=0.03, help="max_sparsity_gap for rank auto and the auto mode")
    p.add_argument("--heldout-windows", type=int, default=16, help="held-out windows per text for recall there")
    p.add_argument("--device", default="cuda")
    args = ap.parse_args()
    {"run": run}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
