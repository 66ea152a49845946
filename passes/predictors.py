"""predictors: a low-rank activation predictor per FFN (PowerInfer / Deja Vu), or exact gating where cheaper.

For every FFN (each layer; each expert of an MoE layer) the pass streams calibration text through the
reference model, collects (FFN input after the norm, active mask) pairs, and trains
`logits = fc2(relu(fc1 x))` (fc1 [rank, hidden], fc2 [inter, rank]) with class-weighted BCE and AdamW,
keeping the epoch that predicts most sparsity at the target recall on held-out sequences.
The per-FFN logit threshold is set on held-out "val" sequences to reach `target_recall`, and rank and mode are
chosen on val too; recall, precision, sparsity and bytes are then reported on separate held-out "test" sequences
(the val figures the mode was chosen on are kept under the FFN's `stats["val"]`).

`rank: auto` picks per FFN the smallest rank of a ladder (capped by a byte budget) whose predicted sparsity is
within `max_sparsity_gap` of the true sparsity. `mode: auto` then compares bytes read per token
(ir.exact_row_shares): exact gating reads the gate fully, up where act(gate) != 0, down where h != 0;
predictor gating reads the predictor plus the predicted-active rows of all three matrices.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, PositiveInt

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.errors import UserError
from tscompile.ir import (RELU_KINDS, ModelIR, Predictor, exact_row_shares, ffn_label, ffn_names,
                          predictor_names)

STATS_KEYS = ("true_sparsity", "gate_sparsity", "bytes_exact", "mode_reason", "samples", "candidate_predictor",
              "recall", "precision", "predicted_sparsity", "rank", "predictor_threshold", "ranks_tried", "epochs",
              "predictor_bytes_share", "bytes_predictor", "val")   # what this pass writes into an FFN's stats


class PredictorsConfig(PassConfig):
    rank: PositiveInt | Literal["auto"] = "auto"
    ranks: list[PositiveInt] = Field(default=[16, 32, 64, 128, 256], min_length=1)   # the ladder `rank: auto` climbs
    max_bytes_share: float = Field(0.08, gt=0, le=1)   # auto: predictor bytes / FFN bytes at most this
    target_recall: float = Field(0.95, gt=0.5, le=1)
    max_sparsity_gap: float = Field(0.05, ge=0, le=1)  # auto: predicted sparsity >= true sparsity - this
    relu: bool = True                                  # False: fc2(fc1 x), Deja Vu's linear predictor
    mode: Literal["auto", "predictor", "exact"] = "auto"
    tokens: int | None = Field(None, gt=0)             # calibration tokens drawn from data.calib's mixture
                                                       # (default: data.calib.tokens)
    held_out: float = Field(0.1, gt=0, lt=0.5)         # share of sequences for val, and again for test
    epochs: int = Field(12, gt=0)
    patience: int = Field(2, gt=0)                     # epochs without val improvement before stopping
    batch_size: int | None = Field(None, gt=0)         # default: 256 on CPU, 2048 on CUDA
    lr: float = Field(2e-2, gt=0)                      # peak of a warmup + cosine schedule
    weight_decay: float = Field(0.01, ge=0)
    memory_gb: float | None = Field(None, gt=0)        # samples held at once (default: 2 on CPU, half the
                                                       # free GPU memory); more FFNs -> extra forwards
    eval_tokens: int = Field(4096, ge=0)               # held-out calibration tokens for the perplexity with
                                                       # predictor vs exact gating (0 = skip)
    forward_dtype: Literal["float32", "bfloat16"] = "float32"   # calibration forward (bf16: models too big
                                                                # for fp32 on one GPU, e.g. Mixtral)


# ---- calibration samples -----------------------------------------------------------------------------------

@dataclass
class FFNSamples:
    """FFN inputs x [N, hidden] (float16), active masks packed 8 neurons a byte [N, ceil(inter/8)]."""
    x: object
    bits: object
    inter: int

    @classmethod
    def from_mask(cls, x, mask) -> FFNSamples:
        return cls(x.half(), pack_bits(mask), mask.shape[-1])

    def __len__(self) -> int:
        return self.x.shape[0]

    def mask(self, rows=slice(None)):
        return unpack_bits(self.bits[rows], self.inter)

    def to(self, device) -> FFNSamples:
        return FFNSamples(self.x.to(device), self.bits.to(device), self.inter)


def pack_bits(mask):
    import torch
    n, m = mask.shape
    padded = torch.zeros(n, -(-m // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :m] = mask
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits, m: int):
    import torch
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :m]


class _StopForward(Exception):
    """Raised from the last capture a calibration forward needs: later layers and the LM head are skipped."""


class _Capture(list):
    def __init__(self, last: bool):
        super().__init__()
        self.last = last

    def append(self, item):
        super().append(item)
        if self.last:
            raise _StopForward


def collect_samples(model, ids, units: list[int], max_rows: int, batch_seqs: int = 8,
                    desc: str = "calibration") -> dict[int, FFNSamples]:
    """Run `ids` [n_seqs, T] through the reference model, capturing the FFNs `units` (ffn_units order)."""
    import torch
    from tqdm import tqdm
    ffns = model.ffns()
    layer_of = [i for i, layer in enumerate(model.model.layers)          # ffn unit -> decoder layer
                for _ in getattr(layer.ffn(), "experts", [None])]
    last_layer = max(layer_of[u] for u in units)
    xs = {u: [] for u in units}
    bits = {u: [] for u in units}
    rows = dict.fromkeys(units, 0)
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[0], batch_seqs), desc=desc, unit="batch", leave=False):
            if all(rows[u] >= max_rows for u in units):
                break
            caps = {}
            for u in units:
                caps[u] = ffns[u].capture = _Capture(last=False)
            # stop after the last FFN module of the deepest captured layer (its experts run in order)
            caps[max(u for u in units if layer_of[u] == last_layer)].last = True
            try:
                model(ids[start:start + batch_seqs], gating="exact")
            except _StopForward:
                pass
            finally:
                for u in units:
                    ffns[u].capture = None
            for u in units:
                for x, h in caps[u]:
                    take = max_rows - rows[u]
                    if take <= 0:
                        break
                    x, h = x.reshape(-1, x.shape[-1])[:take], h.reshape(-1, h.shape[-1])[:take]
                    xs[u].append(x.half())
                    bits[u].append(pack_bits(h != 0))
                    rows[u] += x.shape[0]
    H, I = model.cfg.hidden_size, model.cfg.intermediate_size
    dev = ids.device
    return {u: FFNSamples(torch.cat(xs[u]) if xs[u] else torch.zeros(0, H, dtype=torch.half, device=dev),
                          torch.cat(bits[u]) if bits[u] else torch.zeros(0, -(-I // 8), dtype=torch.uint8,
                                                                         device=dev), I)
            for u in units}


# ---- training and calibration ------------------------------------------------------------------------------

@dataclass
class TrainedPredictor:
    fc1: object          # [rank, hidden] float32
    fc2: object          # [inter, rank]
    relu: bool
    threshold: float     # logit threshold reaching the target recall on val
    val_sparsity: float  # predicted sparsity on val at that threshold
    epochs: int

    @property
    def rank(self) -> int:
        return self.fc1.shape[0]

    def logits(self, x):
        z = x.float() @ self.fc1.T
        return (z.relu() if self.relu else z) @ self.fc2.T


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def positive_logits(pred: TrainedPredictor, samples: FFNSamples, chunk: int = 4096):
    """Logits of the truly active entries, and the total number of entries."""
    import torch
    out = [pred.logits(samples.x[sl]).masked_select(samples.mask(sl)) for sl in _chunks(len(samples), chunk)]
    return torch.cat(out) if out else torch.zeros(0)


def recall_threshold(pos_logits, target_recall: float) -> float:
    """The largest threshold keeping at least `target_recall` of the active entries (logit >= threshold)."""
    n = pos_logits.numel()
    if n == 0:
        return 0.0
    miss = min(n - 1, math.floor((1.0 - target_recall) * n))   # active entries we may drop
    return float(pos_logits.float().kthvalue(miss + 1).values)


def predictor_metrics(pred: TrainedPredictor, samples: FFNSamples, threshold: float,
                      chunk: int = 4096) -> dict[str, float]:
    """recall, precision, predicted and true sparsity of `pred` gated at `threshold` on `samples`."""
    tp = pp = ap = total = 0
    for sl in _chunks(len(samples), chunk):
        predicted = pred.logits(samples.x[sl]) >= threshold
        active = samples.mask(sl)
        tp += int((predicted & active).sum())
        pp += int(predicted.sum())
        ap += int(active.sum())
        total += active.numel()
    total = max(total, 1)
    return {"recall": tp / ap if ap else 1.0, "precision": tp / pp if pp else 1.0,
            "predicted_sparsity": 1 - pp / total, "true_sparsity": 1 - ap / total}


def train_predictor(train: FFNSamples, val: FFNSamples, rank: int, cfg: PredictorsConfig, device: str,
                    seed: int = 0, useful_sparsity: float = 0.0) -> TrainedPredictor:
    """Class-weighted BCE + AdamW; keeps the epoch predicting most sparsity at the target recall on `val`.

    Stops early once even the last epoch's gain, repeated for every remaining epoch, would not lift the val
    predicted sparsity to `useful_sparsity` (below it the predictor cannot pay for itself).
    """
    import torch
    import torch.nn.functional as F
    H, I = train.x.shape[1], train.inter
    gen = torch.Generator().manual_seed(seed)
    # train on x / rms per channel (RMSNorm outputs have a few huge channels), folded into fc1 afterwards
    sq = torch.zeros(H, device=device)
    freq = torch.zeros(I, device=device)
    for sl in _chunks(len(train), 8192):
        sq += train.x[sl].float().pow(2).sum(0)
        freq += train.mask(sl).sum(0)
    scale = (sq / max(len(train), 1)).sqrt().clamp(min=1e-6)
    freq /= max(len(train), 1)
    # rare neurons weigh more (sqrt of the class ratio) so their ranking near the recall cut is learned too
    pos_weight = ((1 - freq) / freq.clamp(min=1e-3)).clamp(1.0, 2500.0).sqrt()
    fc1 = (torch.randn(rank, H, generator=gen) / H ** 0.5).to(device).requires_grad_()
    fc2 = (torch.randn(I, rank, generator=gen) / rank ** 0.5 * 0.1).to(device).requires_grad_()
    opt = torch.optim.AdamW([fc1, fc2], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = cfg.batch_size or (2048 if str(device).startswith("cuda") else 256)
    steps = cfg.epochs * -(-len(train) // batch)
    warm = max(1, steps // 10)   # linear warmup, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / max(steps, 1)))))
    best, stale, epochs = None, 0, 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen).to(device)
        for sl in _chunks(len(train), batch):
            idx = order[sl]
            x, y = train.x[idx].float() / scale, train.mask(idx).float()
            z = x @ fc1.T
            logits = (z.relu() if cfg.relu else z) @ fc2.T
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        epochs = epoch + 1
        with torch.no_grad():
            cand = TrainedPredictor(fc1.detach() / scale, fc2.detach().clone(), cfg.relu, 0.0, 0.0, epochs)
            cand.threshold = recall_threshold(positive_logits(cand, val), cfg.target_recall)
            cand.val_sparsity = predictor_metrics(cand, val, cand.threshold)["predicted_sparsity"]
        gain = cand.val_sparsity - (best.val_sparsity if best else 0.0)
        if best is None or gain > 1e-4:
            best, stale = cand, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
        if epochs >= 2 and best.val_sparsity + max(gain, 0.0) * (cfg.epochs - epochs) < useful_sparsity:
            break
    best.epochs = epochs
    return best


# ---- per-FFN decisions -------------------------------------------------------------------------------------

def predictor_share(rank: int, hidden: int, inter: int) -> float:
    """Predictor bytes / FFN bytes (same dtype): rank (hidden + inter) / (3 hidden inter)."""
    return rank * (hidden + inter) / (3 * hidden * inter)


def rank_ladder(cfg: PredictorsConfig, hidden: int, inter: int) -> list[int]:
    """Ranks to try, ascending; `auto` keeps those within the byte budget (at least the smallest)."""
    if cfg.rank != "auto":
        return [cfg.rank]
    ladder = sorted(set(cfg.ranks))
    fit = [r for r in ladder if predictor_share(r, hidden, inter) <= cfg.max_bytes_share]
    return fit or ladder[:1]


def fit_unit(train: FFNSamples, val: FFNSamples, cfg: PredictorsConfig, device: str, seed: int,
             exact_share: float | None = None) -> tuple[TrainedPredictor, list[int]]:
    """The smallest ladder rank whose val predicted sparsity is within the gap of the true sparsity.

    The largest affordable rank is trained first: if it misses the gap no smaller one will reach it, so it is
    kept as the best there is (one training for an unpredictable FFN); otherwise a binary search goes down.
    With `exact_share` (mode auto: exact gating's bytes / FFN bytes) a training stops early when it cannot beat
    them; a smaller rank's training also stops once it cannot reach the gap (it would be rejected anyway).
    """
    H, I = train.x.shape[1], train.inter
    ladder = rank_ladder(cfg, H, I)
    true_sparsity = observed_sparsity(val)
    tried: dict[int, TrainedPredictor] = {}

    def good(k: int) -> bool:
        r = ladder[k]
        if r not in tried:
            # the predicted sparsity at which predictor_bytes falls below exact_share
            useful = 0.0 if exact_share is None else 1 + predictor_share(r, H, I) - exact_share
            if k < len(ladder) - 1:
                useful = max(useful, true_sparsity - cfg.max_sparsity_gap)
            tried[r] = train_predictor(train, val, r, cfg, device, seed, useful)
        return tried[r].val_sparsity >= true_sparsity - cfg.max_sparsity_gap

    lo, hi = 0, len(ladder) - 1
    if good(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            if good(mid):
                hi = mid
            else:
                lo = mid + 1
    return tried[ladder[hi]], sorted(tried)


def observed_sparsity(*splits: FFNSamples) -> float:
    """Share of inactive entries in the first of `splits` holding samples (an expert may get few routed tokens);
    NaN if none does."""
    seen = next((d for d in splits if len(d)), None)
    return 1 - float(seen.mask().float().mean()) if seen is not None else float("nan")


def exact_bytes(s_gate: float, true_sparsity: float) -> float:
    """Bytes exact gating reads per token / FFN bytes (exact_row_shares of three equal matrices)."""
    return sum(exact_row_shares(s_gate, true_sparsity)) / 3


def predictor_bytes(share: float, predicted_sparsity: float) -> float:
    """Bytes predictor gating reads per token / FFN bytes: the predictor, then the predicted-active rows of all
    three matrices."""
    return share + 1 - predicted_sparsity


def gate_sparsity(ir: ModelIR, layer: int, expert: int | None, samples: FFNSamples) -> float:
    """Fraction of neurons whose act(gate) is exactly zero (relu kinds), i.e. up rows exact mode skips."""
    import torch
    ann = ir.layers[layer] if expert is None else ir.layers[layer].experts[expert]
    if ann.activation not in RELU_KINDS or len(samples) == 0:
        return 0.0
    wg = ir.weights[ffn_names(layer, expert)[0]].to(samples.x.device, torch.float32)
    zero = sum(int(((samples.x[sl].float() @ wg.T) <= 0).sum()) for sl in _chunks(len(samples), 4096))
    return zero / (len(samples) * samples.inter)


def choose_mode(cfg_mode: str, exact: float, predictor: float | None, gap: float | None = None,
                max_gap: float = 1.0) -> tuple[str, str]:
    """(mode, why). Costs are bytes read per token / FFN bytes (exact_bytes, predictor_bytes); `gap` is true minus
    predicted sparsity. Auto takes the predictor only if it reads fewer bytes and is accurate enough (a
    predictor far below the true sparsity mispredicts many neurons, and gating all of them costs quality)."""
    if cfg_mode == "exact" or predictor is None:
        return "exact", "mode: exact requested" if cfg_mode == "exact" else "no predictor could be trained"
    if cfg_mode == "predictor":
        return "predictor", "mode: predictor requested"
    if predictor >= exact:
        return "exact", f"exact reads {exact:.3f} vs predictor {predictor:.3f} of the FFN's bytes"
    if gap is not None and gap > max_gap:
        return "exact", (f"predictor reads {predictor:.3f} vs exact {exact:.3f} of the FFN's bytes but "
                         f"predicts {gap:.3f} less sparsity than true (max_sparsity_gap {max_gap})")
    return "predictor", f"predictor reads {predictor:.3f} vs exact {exact:.3f} of the FFN's bytes"


# ---- the pass ----------------------------------------------------------------------------------------------

def sample_memory(cfg: PredictorsConfig, device: str) -> float:
    """Bytes of calibration samples to hold at once."""
    import torch
    if cfg.memory_gb is not None:
        return cfg.memory_gb * 1024**3
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2
    return 2 * 1024**3


def used_sequences(ids, cfg: PredictorsConfig):
    """The calibration sequences the pass uses: the first `cfg.tokens` worth, or all."""
    return ids if cfg.tokens is None else ids[:max(3, -(-cfg.tokens // ids.shape[1]))]


def split_sequences(ids, held_out: float, seed: int = 0):
    """(train, val, test) sequence batches: val and test each get `held_out` of the sequences (at least one),
    drawn at random so a mixture's sources land in every split alike."""
    import torch
    n = ids.shape[0]
    k = max(1, round(n * held_out))
    if n < 2 * k + 1:
        raise UserError(f"data.calib: {n} calibration sequences are too few for predictors "
                        f"(need {2 * k + 1}: train + val + test)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(ids.device)
    return ids[perm[:n - 2 * k]], ids[perm[n - 2 * k:n - k]], ids[perm[n - k:]]


def fit_predictors(ir: ModelIR, cfg: PredictorsConfig, calib_ids, device: str = "cpu", log=None,
                   seed: int = 0) -> ModelIR:
    """Train (or decide against) a predictor for every FFN of `ir` on calibration sequences [n, T]."""
    import logging

    import torch
    from tqdm import tqdm

    from tscompile.reference import ReferenceModel
    log = log or logging.getLogger("tscompile")
    t0 = time.time()
    out = ir.clone()
    for layer, expert, ann in out.ffn_units():   # start from the exact function: drop any old predictor
        if ann.predictor is not None:
            for n in predictor_names(layer, expert):
                del out.weights[n]
        ann.predictor, ann.mode = None, "exact"
    units = list(out.ffn_units())
    H, I = ir.config.hidden_size, ir.config.intermediate_size
    cuda = str(device).startswith("cuda")
    ids = used_sequences(calib_ids, cfg).to(device)
    train_ids, val_ids, test_ids = split_sequences(ids, cfg.held_out, seed)
    model = ReferenceModel.from_ir(out, getattr(torch, cfg.forward_dtype), device)
    # MoE experts see about top_k/num_experts of the tokens: cap rows per FFN at the dense token count
    rows = {"train": train_ids.numel(), "val": val_ids.numel(), "test": test_ids.numel()}
    per_unit = sum(rows.values()) * (H * 2 + -(-I // 8))   # bytes of one FFN's samples
    group = max(1, int(sample_memory(cfg, device) // per_unit))
    batch_seqs = max(1, (32768 if cuda else 4096) // ids.shape[1])   # sequences per calibration forward
    log.info("predictors: %d FFNs, %d calibration tokens (%d train / %d val / %d test), %d FFNs per pass",
             len(units), sum(rows.values()), rows["train"], rows["val"], rows["test"], min(group, len(units)))
    per_ffn = []
    bar = tqdm(total=len(units), desc="predictors", unit="ffn")
    for g0 in range(0, len(units), group):
        idx = list(range(g0, min(len(units), g0 + group)))
        data = {split: collect_samples(model, s, idx, rows[split], batch_seqs, f"calibration {split}")
                for split, s in (("train", train_ids), ("val", val_ids), ("test", test_ids))}
        for u in idx:
            layer, expert, ann = units[u]
            tr, va, te = data["train"].pop(u), data["val"].pop(u), data["test"].pop(u)
            where = ffn_label(layer, expert)
            s_gate = gate_sparsity(out, layer, expert, va)
            # `mode: auto` decides on val (train where an expert got no val token); test sequences only report
            val = {"true_sparsity": observed_sparsity(va, tr)}
            val["bytes_exact"] = exact_bytes(s_gate, val["true_sparsity"])
            pred = gap = None
            if cfg.mode != "exact" and len(tr) >= 16 and len(va) >= 4 and len(te) >= 1:
                pred, tried = fit_unit(tr, va, cfg, device, seed + u,
                                       val["bytes_exact"] if cfg.mode == "auto" else None)
                share = predictor_share(pred.rank, H, I)
                val |= {"predicted_sparsity": pred.val_sparsity,
                        "bytes_predictor": predictor_bytes(share, pred.val_sparsity)}
                gap = val["true_sparsity"] - pred.val_sparsity
            mode, why = choose_mode(cfg.mode, val["bytes_exact"], val.get("bytes_predictor"), gap,
                                    cfg.max_sparsity_gap)
            if mode == "exact" and val["true_sparsity"] < 0.01:   # nothing to skip: the dense kernels are faster
                mode, why = "dense", f"{why}; no activation sparsity ({val['true_sparsity']:.4f}): dense"
            true_sparsity = observed_sparsity(te, va, tr)
            stats = {"true_sparsity": true_sparsity, "gate_sparsity": s_gate,
                     "bytes_exact": exact_bytes(s_gate, true_sparsity), "mode_reason": why, "val": val,
                     "samples": {"train": len(tr), "val": len(va), "test": len(te)}}
            cand = None
            if pred is not None:
                cand = predictor_metrics(pred, te, pred.threshold)
                cand |= {"rank": pred.rank, "predictor_threshold": pred.threshold, "ranks_tried": tried,
                         "epochs": pred.epochs, "predictor_bytes_share": share,
                         "bytes_predictor": predictor_bytes(share, cand["predicted_sparsity"])}
            # a rejected predictor's figures stay apart, so tables read recall/predicted sparsity of gated FFNs only
            stats |= cand if mode == "predictor" else {"candidate_predictor": cand} if cand else {}
            ann.mode = mode
            ann.stats = {k: v for k, v in ann.stats.items() if k not in STATS_KEYS} | stats
            if mode == "predictor":
                f1, f2 = predictor_names(layer, expert)
                out.weights[f1], out.weights[f2] = pred.fc1.cpu().contiguous(), pred.fc2.cpu().contiguous()
                ann.predictor = Predictor(rank=pred.rank, threshold=pred.threshold, relu=pred.relu)
            log.info("predictors: %s: %s (%s); true sparsity %.3f%s", where, mode, why, true_sparsity,
                     "" if cand is None else f"; predictor rank {pred.rank}: predicted sparsity "
                     f"{cand['predicted_sparsity']:.3f} at recall {cand['recall']:.3f}")
            per_ffn.append(stats)
            bar.update()
        del data
    bar.close()
    chosen = [s for s, (_, _, a) in zip(per_ffn, units) if a.mode == "predictor"]
    out.meta["predictors"] = {
        "seconds": round(time.time() - t0, 1), "device": device, "target_recall": cfg.target_recall,
        "calibration_tokens": sum(rows.values()), "ffns": len(units), "predictor_ffns": len(chosen),
        "mean_true_sparsity": _mean(s["true_sparsity"] for s in per_ffn),
        "mean_predicted_sparsity": _mean(s["predicted_sparsity"] for s in chosen),
        "mean_recall": _mean(s["recall"] for s in chosen),
        "predictor_bytes_share": _mean(s["predictor_bytes_share"] for s in chosen),
    }
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if not math.isnan(x)]   # NaN: an expert that saw no calibration token
    return sum(xs) / len(xs) if xs else None


def model_perplexity(model, ids, device: str, gating: str, batch_seqs: int = 4) -> float:
    """Perplexity of a ReferenceModel on `ids` [n, T] (every next token of every sequence)."""
    import torch
    import torch.nn.functional as F
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_seqs):
            batch = ids[s:s + batch_seqs].to(device)
            logits = model(batch, gating=gating)[:, :-1]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum"))
            n += batch[:, 1:].numel()
    return math.exp(nll / max(n, 1))


def gated_perplexity(ir: ModelIR, ids, device: str, batch_seqs: int = 4,
                     dtype: str = "float32") -> dict[str, float]:
    """Perplexity on `ids` [n, T], predictor gating on every token (what sparse decode computes) vs exact."""
    import torch

    from tscompile.reference import ReferenceModel
    model = ReferenceModel.from_ir(ir, getattr(torch, dtype), device)
    ppl = {g: model_perplexity(model, ids, device, g, batch_seqs) for g in ("exact", "predictor")}
    return {"ppl_exact": ppl["exact"], "ppl_predictor": ppl["predictor"],
            "ppl_ratio": ppl["predictor"] / ppl["exact"], "tokens": int(ids.numel())}


def held_out_calibration(calib_ids, cfg: PredictorsConfig, seed: int):
    """About cfg.eval_tokens tokens of the calibration sequences held out from fitting (the test split). They are
    in the pass's cache key; the spec's eval texts are not, and the verifier measures those (measure_quality)."""
    test = split_sequences(used_sequences(calib_ids, cfg), cfg.held_out, seed)[2]
    return test[:max(1, -(-cfg.eval_tokens // calib_ids.shape[1]))]


def apply_predictors(ir: ModelIR, cfg: PredictorsConfig, ctx: Context) -> ModelIR:
    from tscompile.passes.profile import calib_spec

    from tscompile.data import calibration_batch
    c = ir.config
    low = min(c.hidden_size, c.intermediate_size)
    # neither low-rank nor cheap; `auto` falls back to its smallest rank when none fits the byte budget
    if (cfg.rank if cfg.rank != "auto" else min(cfg.ranks)) > low:
        what = f"rank {cfg.rank}" if cfg.rank != "auto" else f"rank auto's smallest of ranks {sorted(cfg.ranks)}"
        raise UserError(f"pipeline predictors: {what} is more than min(hidden, intermediate) = {low} of this model")
    calib = calib_spec(ctx, "predictors")
    if cfg.tokens is not None:   # predictors may want more (or less) text than the other passes' data.calib
        calib = calib.model_copy(update={"tokens": cfg.tokens})
    ids = calibration_batch(ir, calib, ctx.device, ctx.seed)
    out = fit_predictors(ir, cfg, ids, ctx.device, ctx.log, ctx.seed)
    if not any(a.mode == "predictor" for _, _, a in out.ffn_units()):
        out.meta["predictors"]["held_out_perplexity"] = "no FFN uses predictor gating: same function as exact"
    elif cfg.eval_tokens:
        p = gated_perplexity(out, held_out_calibration(ids, cfg, ctx.seed), ctx.device, dtype=cfg.forward_dtype)
        out.meta["predictors"]["held_out_perplexity"] = p
        ctx.log.info("predictors: held-out calibration perplexity %.3f with predictor gating vs %.3f exact "
                     "(ratio %.4f)", p["ppl_predictor"], p["ppl_exact"], p["ppl_ratio"])
    return out


def plot_predictors(ir: ModelIR, out_png) -> None:
    """Per FFN: recall and predicted sparsity of its predictor, true sparsity to compare; exact FFNs marked."""
    from pathlib import Path

    from tscompile.report import draw_predictors, save_plot
    ffns = [a.to_json() for _, _, a in ir.ffn_units()]
    save_plot(Path(out_png), lambda ax: draw_predictors(ax, ffns))


PASS = PassInfo(name="predictors", version="4",
                doc="low-rank activation predictor per FFN (or exact gating where cheaper)",
                config=PredictorsConfig, run=apply_predictors, needs_data=("calib",), gpu="optional")
