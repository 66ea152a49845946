"""The ReLUfication fine-tune loop (used by passes/relufy.py and benchmarks/relufy_gpu.py).

One optimizer step = `batch_tokens` tokens: windows of `seq_len + 1` tokens (inputs + shifted targets) taken in a
seeded random order, split over ranks, then over micro-batches (gradient accumulation). Loss per token:

    (1 - distill) * CE(student, next token) + distill * KL(teacher || student) + λ(step) * L1

    L1 = Σ_layers mean_tokens Σ_neurons |h|          (h: FFN intermediate after the activation)

λ(step) follows the stages (constant, or ProSparse's sine ramp); with `l1_control`, stages of constant λ > 0
scale it by a factor k that a log-space integral controller moves toward the target training-batch sparsity.

Multi-GPU runs are the same code under `torchrun` (FSDP2 `fully_shard` per decoder layer; gloo on CPU, NCCL on
CUDA). Checkpoints (weights, AdamW state, RNG, data position, controller state) are safetensors + JSON, written
to a temp dir and renamed, then published by atomically replacing `latest.json`; a killed run resumes from the
newest one to bit-identical weights (CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cache import atomic_dir, write_text_atomic
from .errors import UserError

LOG_NAME = "train_log.jsonl"
LATEST = "latest.json"


# ---- schedules ---------------------------------------------------------------------------------------------

def stage_bounds(stages) -> list[tuple[int, int]]:
    """(T0, T1) per stage: the stage covers 1-based steps T0 < s <= T1."""
    out, t = [], 0
    for st in stages:
        out.append((t, t + st.steps))
        t += st.steps
    return out


def stage_index(stages, step: int) -> int:
    """Stage of the 0-based optimizer step `step` (the last stage past the end)."""
    for i, (_, t1) in enumerate(stage_bounds(stages)):
        if step < t1:
            return i
    return len(stages) - 1


def l1_at(stages, step: int) -> float:
    """λ for the 0-based step `step`. A sine stage ramps λ_prev -> to with
    η = ½[sin(−π/2 + π·(s−T0)/(T1−T0)) + 1], s = step + 1 (ProSparse's 1-based steps), so the stage's last step
    uses exactly `to`. `from` defaults to the previous stage's final λ."""
    i = stage_index(stages, step)
    t0, t1 = stage_bounds(stages)[i]
    l1 = stages[i].l1
    if isinstance(l1, (int, float)):
        return float(l1)
    start = l1.from_ if l1.from_ is not None else (final_l1(stages[i - 1]) if i else 0.0)
    progress = min(1.0, (step + 1 - t0) / (t1 - t0))          # past the last stage: hold its end value
    eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * progress) + 1.0)
    return start + eta * (l1.to - start)


def final_l1(stage) -> float:
    l1 = stage.l1
    return float(l1) if isinstance(l1, (int, float)) else float(l1.to)


def lr_at(stages, step: int, base_lr: float, min_lr_ratio: float) -> float:
    """Per stage: linear warmup to the stage's peak, then cosine to min_lr_ratio·peak (or constant)."""
    i = stage_index(stages, step)
    st = stages[i]
    t0, t1 = stage_bounds(stages)[i]
    peak = st.lr if st.lr is not None else base_lr
    k = step - t0
    warm = st.warmup if st.warmup is not None else (min(100, st.steps // 10) if i == 0 else 0)
    if k < warm:
        return peak * (k + 1) / warm
    if st.lr_schedule == "constant":
        return peak
    p = (k - warm) / max(1, (t1 - t0) - warm)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ---- data --------------------------------------------------------------------------------------------------

class TokenWindows:
    """Training windows [n, seq_len+1] (inputs + shifted targets) served in a seeded random order that is
    reshuffled every epoch. Position `pos` (windows served so far) is all the state a resume needs."""

    def __init__(self, windows: np.ndarray, seed: int):
        if windows.ndim != 2 or len(windows) < 1 or windows.shape[1] < 2:
            raise ValueError(f"training windows must be [n >= 1, seq_len + 1 >= 2], got {windows.shape}")
        self.windows, self.seed = windows, seed
        self.count, self.seq_len = len(windows), windows.shape[1] - 1
        self._perm: tuple[int, np.ndarray] | None = None

    def take(self, pos: int, n: int) -> torch.Tensor:
        """Windows pos .. pos+n-1 of the endless shuffled order -> LongTensor [n, seq_len+1]."""
        rows = []
        for p in range(pos, pos + n):
            epoch, k = divmod(p, self.count)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
            rows.append(self.windows[int(self._perm[1][k])].astype(np.int64))
        return torch.from_numpy(np.stack(rows))


# ---- model helpers -----------------------------------------------------------------------------------------

def causal_attention(model) -> None:
    """Swap each attention's forward for one through F.scaled_dot_product_attention(is_causal=True) (flash
    attention on CUDA). Training windows are full causal sequences (no padding, no cache), where this is the
    same function as the reference's fp32 attention with an explicit mask, which rules flash attention out."""
    import types

    from tscompile.reference import apply_rope
    if model.cfg.sliding_window:     # a window shorter than the sequence needs the reference's explicit mask
        return

    def forward(self, x, cos, sin, mask, cache, i):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.nh // self.nkv
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)


def ffn_outputs(model) -> list[torch.Tensor]:
    """The intermediate h of every FFN that ran in the last forward (needs `start_capture`; an MoE expert no
    token was routed to has none)."""
    return [f.capture[-1][1] for f in model.ffns() if f.capture]


def zero_counts(model, device) -> torch.Tensor:
    """[n_ffn, 2] float64 on `device`: (exact zeros in h, elements of h) per FFN in the last forward.
    Stays on the device: no host sync between micro-batches."""
    rows = []
    for f in model.ffns():
        h = f.capture[-1][1] if f.capture else None
        rows.append(torch.zeros(2, dtype=torch.float64, device=device) if h is None else torch.stack(
            [(h == 0).sum().double(), torch.tensor(float(h.numel()), dtype=torch.float64, device=device)]))
    return torch.stack(rows)


def per_ffn_sparsity(counts: torch.Tensor) -> list[float]:
    return (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()


def start_capture(model) -> None:
    for f in model.ffns():
        f.capture = []


def stop_capture(model) -> None:
    for f in model.ffns():
        f.capture = None


def lm_losses(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None):
    """Mean next-token CE and mean KL(teacher || student) per token (KL 0 without a teacher)."""
    v = logits.shape[-1]
    lf = logits.reshape(-1, v).float()
    ce = F.cross_entropy(lf, targets.reshape(-1))
    if teacher_logits is None:
        return ce, torch.zeros((), device=logits.device)
    logp = F.log_softmax(lf, -1)
    logq = F.log_softmax(teacher_logits.reshape(-1, v).float(), -1)
    kl = F.kl_div(logp, logq, log_target=True, reduction="batchmean")
    return ce, kl


def flops_per_token(cfg, seq_len: int, teacher: bool) -> float:
    """Matmul FLOPs per trained token: 6·N (N = matmul params incl. the head) + attention scores and values
    (fwd 4·L·T·d_attn, ×3 with backward), plus a forward of the teacher when distilling."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = H * cfg.num_heads * cfg.head_dim * 2 + H * cfg.num_kv_heads * cfg.head_dim * 2
    ffn = 3 * H * I * max(1, cfg.num_experts_per_tok)
    n = L * (attn + ffn) + H * cfg.vocab_size
    att = 4 * L * seq_len * cfg.num_heads * cfg.head_dim / 2   # causal: half the score matrix
    return 3 * (2 * n + att) + ((2 * n + att) if teacher else 0)


@torch.no_grad()
def evaluate(model, windows: np.ndarray, micro_batch: int, device, autocast) -> dict[str, Any]:
    """Perplexity and per-FFN sparsity over held-out windows [n, seq_len+1] (each rank its share; summed)."""
    import torch.distributed as dist
    world, rank = _world()
    n = (len(windows) // world) * world   # every rank runs as many forwards (FSDP gathers inside each)
    if n == 0:
        raise UserError(f"relufy: {len(windows)} held-out window(s) cannot be shared by {world} ranks: raise "
                        f"eval_tokens to at least {world} windows of seq_len tokens")
    mine = windows[rank:n:world]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(len(model.ffns()), 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    start_capture(model)
    for i in range(0, len(mine), micro_batch):
        batch = torch.from_numpy(mine[i:i + micro_batch].astype(np.int64)).to(device)
        for f in model.ffns():
            f.capture.clear()
        with autocast():
            logits = model(batch[:, :-1])
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="sum").double()
        tokens += batch[:, 1:].numel()
        counts += zero_counts(model, device)
    stop_capture(model)
    model.train(was_training)
    if world > 1:
        for t in (nll, tokens, counts):
            dist.all_reduce(t)
    per_layer = per_ffn_sparsity(counts)
    return {"ppl": math.exp(float(nll / tokens.clamp(min=1))), "tokens": int(tokens),
            "sparsity": sum(per_layer) / len(per_layer), "per_layer_sparsity": per_layer}


def _world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# ---- checkpoints -------------------------------------------------------------------------------------------

def _state_options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=full)


def save_checkpoint(work_dir: Path, model, opt, state: dict, keep: int = 1) -> None:
    """Rank 0 writes checkpoint-<step>/ {model,optimizer,rng}.safetensors + state.json, then points latest.json
    at it (atomic replace) and removes older ones. Every rank must call (the state is gathered collectively)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    world, rank = _world()
    opts = _state_options(world > 1)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    if rank != 0:
        return
    name = f"checkpoint-{state['step']:07d}"
    with atomic_dir(work_dir / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in msd.items()}, str(tmp / "model.safetensors"))
        opt_tensors, opt_scalars = {}, {}
        for pname, st in osd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    opt_tensors[f"{pname}::{key}"] = val.detach().cpu().contiguous()
                else:
                    opt_scalars[f"{pname}::{key}"] = val
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = dict(state, param_groups=osd["param_groups"], optimizer_scalars=opt_scalars)
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    write_text_atomic(work_dir / LATEST, json.dumps({"checkpoint": name, "step": state["step"]}))
    for old in sorted(work_dir.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work_dir: Path, model, opt) -> dict | None:
    """Restore the newest published checkpoint into model and optimizer; returns its state (None if none)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    latest = work_dir / LATEST
    if not latest.exists():
        return None
    ck = work_dir / json.loads(latest.read_text())["checkpoint"]
    meta = json.loads((ck / "state.json").read_text())
    opts = _state_options(False)
    set_model_state_dict(model, load_file(str(ck / "model.safetensors")), options=opts)
    state: dict[str, dict] = {}
    for key, val in load_file(str(ck / "optimizer.safetensors")).items():
        pname, k = key.split("::")
        state.setdefault(pname, {})[k] = val
    for key, val in meta.pop("optimizer_scalars").items():
        pname, k = key.split("::")
        state.setdefault(pname, {})[k] = val
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": meta.pop("param_groups")}, options=opts)
    rng = load_file(str(ck / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it resumes from."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


# ---- the loop ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    final: dict[str, Any]                      # last training-step record
    heldout: dict[str, dict] | None            # held-out eval per text after the last step
    tokens_per_second: float                   # over the steps this process ran
    mfu: float | None                          # vs `peak_flops` when given
    history: list[dict] = field(default_factory=list)


def shard_model(model) -> None:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(model, cfg, train_data: TokenWindows, heldout: dict[str, np.ndarray], work_dir: Path, device: str = "cpu",
          teacher=None, log=None, max_seconds: float | None = None, peak_flops: float | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) the staged fine-tune in place on `model` (a ReferenceModel on `device`).

    heldout: name -> windows [n, seq_len+1] never trained on, evaluated every `eval_every` steps and at the end.
    cfg: RelufyConfig-like (stages, lr, min_lr_ratio, batch_tokens, micro_batch, weight_decay, betas, grad_clip,
    distill, l1_control, checkpoint_every, eval_every, activation_checkpointing, compile).
    max_seconds: stop (after checkpointing) once this much wall time is used; the next call resumes.
    """
    import torch.distributed as dist
    from tqdm import tqdm
    work_dir = Path(work_dir)
    world, rank = _world()
    seq_len = train_data.seq_len
    total_steps = sum(s.steps for s in cfg.stages)
    per_step = cfg.batch_tokens // seq_len
    if per_step < world or per_step % world:   # one rank: checked at plan time (RelufyConfig.spec_errors)
        raise UserError(f"relufy: batch_tokens {cfg.batch_tokens} is {per_step} windows of {seq_len} tokens, "
                        f"which {world} ranks cannot share evenly")
    per_rank = per_step // world
    micro = max(1, min(cfg.micro_batch, per_rank))
    if per_rank % micro:
        raise UserError(f"relufy: micro_batch {micro} does not divide the {per_rank} windows each of {world} ranks "
                        "gets per step")
    on_cuda = str(device).startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext

    model.train()
    causal_attention(model)
    if cfg.activation_checkpointing:
        _checkpoint_layers(model)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    if world > 1:
        shard_model(model)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    resumed = load_checkpoint(work_dir, model, opt)
    step = resumed["step"] if resumed else 0
    pos = resumed["data_pos"] if resumed else 0
    log_k = resumed["log_k"] if resumed else 0.0
    log_path = work_dir / LOG_NAME
    if rank == 0:
        if resumed:
            _truncate_log(log_path, step)
        elif log_path.exists():
            log_path.unlink()
    if teacher is not None:
        causal_attention(teacher)
    start_capture(model)
    fpt = flops_per_token(model.cfg, seq_len, teacher is not None and cfg.distill > 0)
    t_start, tokens_run, last, history = time.time(), 0, {}, []
    bar = tqdm(total=total_steps, initial=step, desc="relufy", leave=False,
               disable=True if not progress or rank != 0 else None)   # None: on a terminal only
    stop_early = False
    while step < total_steps:
        t0 = time.time()
        lr = lr_at(cfg.stages, step, cfg.lr, cfg.min_lr_ratio)
        lam_sched = l1_at(cfg.stages, step)
        controlled = (cfg.l1_control is not None and lam_sched > 0
                      and isinstance(cfg.stages[stage_index(cfg.stages, step)].l1, (int, float)))
        lam = lam_sched * math.exp(log_k) if controlled else lam_sched
        for g in opt.param_groups:
            g["lr"] = lr
        batch = train_data.take(pos + rank * per_rank, per_rank).to(device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)      # loss, ce, kl, l1
        counts = torch.zeros(len(model.ffns()), 2, dtype=torch.float64, device=device)
        n_micro = per_rank // micro
        for m in range(n_micro):
            x = batch[m * micro:(m + 1) * micro]
            if world > 1:
                model.set_requires_gradient_sync(m == n_micro - 1)
            for f in model.ffns():
                f.capture.clear()
            t_logits = None
            if teacher is not None and cfg.distill > 0:
                with torch.no_grad(), autocast():
                    t_logits = teacher(x[:, :-1])
            with autocast():
                logits = model(x[:, :-1])
                hs = ffn_outputs(model)
                ce, kl = lm_losses(logits, x[:, 1:], t_logits)
                l1 = torch.stack([h.float().abs().sum(-1).mean() for h in hs]).sum()
                lm = (1 - cfg.distill) * ce + cfg.distill * kl if t_logits is not None else ce
                loss = lm + lam * l1
            (loss / n_micro).backward()
            with torch.no_grad():
                counts += zero_counts(model, device)
                sums += torch.stack([loss.detach(), ce.detach(), kl.detach(), l1.detach()]).double() / n_micro
            del logits, t_logits, hs, loss
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            sums /= world
        loss_v, ce_v, kl_v, l1_v = sums.tolist()
        per_layer = per_ffn_sparsity(counts)
        sp_v = sum(per_layer) / len(per_layer)
        if controlled:
            # integral control in log space: λ grows while the batch is denser than the target, shrinks when sparser
            log_k = max(-8.0, min(8.0, log_k + cfg.l1_control.gain * (cfg.l1_control.target - sp_v)))
        step += 1
        pos += per_step
        tokens_run += per_step * seq_len
        dt = time.time() - t0
        gn = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        last = {"step": step, "stage": cfg.stages[stage_index(cfg.stages, step - 1)].name, "lr": lr,
                "lambda": lam, "l1_scale": math.exp(log_k), "loss": loss_v, "ce": ce_v, "kl": kl_v, "l1": l1_v,
                "sparsity": sp_v, "grad_norm": gn,
                "tokens": pos * seq_len, "tokens_per_s": per_step * seq_len / dt}
        if peak_flops:
            last["mfu"] = last["tokens_per_s"] * fpt / (peak_flops * world)
        if step % cfg.log_layers_every == 0 or step == total_steps:
            last["per_layer_sparsity"] = per_layer
        want_eval = bool(heldout) and (step % cfg.eval_every == 0 or step == total_steps)
        out_of_time = max_seconds is not None and time.time() - t_start > max_seconds
        if want_eval:
            stop_capture(model)
            last["heldout"] = {name: evaluate(model, w, micro, device, autocast) for name, w in heldout.items()}
            start_capture(model)
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
        history.append(last)
        bar.update(1)
        bar.set_postfix(ce=f"{ce_v:.3f}", kl=f"{kl_v:.3f}", sp=f"{sp_v:.3f}", lam=f"{lam:.2e}")
        if step % cfg.checkpoint_every == 0 or step == total_steps or out_of_time:
            save_checkpoint(work_dir, model, opt, {"step": step, "data_pos": pos, "log_k": log_k,
                                                   "tokens": pos * seq_len})
        if out_of_time and step < total_steps:
            stop_early = True
            break
    bar.close()
    if not last and heldout:            # resumed at the end (a run killed after its last checkpoint)
        last = {"step": step, "heldout": {name: evaluate(model, w, micro, device, autocast)
                                          for name, w in heldout.items()}}
    stop_capture(model)
    elapsed = time.time() - t_start
    tps = tokens_run / elapsed if elapsed > 0 else 0.0
    heldout_final = last.get("heldout") if last and not stop_early else None
    if log:
        log.info("relufy: step %d/%d, %.0f tokens/s", step, total_steps, tps)
    return TrainResult(step, last, heldout_final, tps, tps * fpt / (peak_flops * world) if peak_flops else None,
                       history)


def _checkpoint_layers(model) -> None:
    """Recompute each decoder layer in backward (activation checkpointing) to trade compute for memory."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        fwd = layer.forward
        layer.forward = lambda *a, _f=fwd: checkpoint(_f, *a, use_reentrant=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """HF-named weights on CPU (gathered from every rank under FSDP; every rank must call)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    world, _ = _world()
    sd = get_model_state_dict(model, options=_state_options(world > 1))
    return {k: v.detach().cpu() for k, v in sd.items() if k != "inv_freq"}
