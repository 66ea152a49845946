"""relufy: the ReLUfication fine-tune (ProSparse), run after `drelu` (or relu) swapped the activation.

Loss per token = (1 - distill)·CE + distill·KL(dense source model || student) + λ·L1, where

    L1 = Σ_layers mean_tokens Σ_neurons |h|        (h = relu(x Wg)·relu(x Wu), the FFN intermediate)

i.e. ProSparse's ‖x1‖₁ per token (summed over the d_ff neurons, not averaged), averaged over tokens, summed
over layers. Summing over neurons makes λ d_ff times stronger than a per-layer mean: λ = 0.05 on a mean
(≈ 3e-5 here) left SmolLM2 at 81%; here a sine ramp to λ = 5e-4 took it from 81% to 88% and λ ≈ 1.9e-3 to
92% (benchmarks/results/relufy_smollm2/).
λ per stage is a constant or a sine ramp from the previous stage's λ (ProSparse's η schedule); `l1_control`
optionally scales it toward a target training sparsity. The loop lives in tscompile/trainer.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from tscompile.api import Context, PassConfig, PassInfo
from tscompile.cache import atomic_file
from tscompile.errors import UserError
from tscompile.ir import RELU_KINDS, ModelIR, ffn_label

DEFAULT_MAX_TRAIN_TOKENS = 32_000_000


class L1Ramp(PassConfig):
    """λ rises along η = ½[sin(−π/2 + π·(t−T0)/(T1−T0)) + 1] from `from` (default: the previous stage's λ)."""
    model_config = ConfigDict(populate_by_name=True)
    schedule: Literal["sine"]
    from_: float | None = Field(None, alias="from", ge=0)
    to: float = Field(ge=0)


class L1Control(PassConfig):
    """In stages of constant λ > 0, use λ·k with log k += gain·(target − batch sparsity) after each step."""
    target: float = Field(gt=0, lt=1, description="training-batch FFN sparsity to steer toward")
    gain: float = Field(0.5, gt=0, description="log-λ change per step per unit of sparsity error")


class Stage(PassConfig):
    name: str
    steps: int = Field(gt=0)
    lr: float | None = Field(None, gt=0, description="peak lr of this stage (default: the pass's lr)")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int | None = Field(None, ge=0, description="default: min(100, steps/10) in the first stage, else 0")
    l1: float | L1Ramp = Field(0.0, description="λ: a constant (>= 0) or {schedule: sine, from, to}")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.l1, float) and self.l1 < 0:
            raise ValueError("l1 must be >= 0")
        if self.warmup is not None and self.warmup > self.steps:
            raise ValueError(f"warmup {self.warmup} is longer than the stage ({self.steps} steps)")
        return self


class RelufyConfig(PassConfig):
    """The fine-tune: stages (each a number of steps with an lr and λ schedule) and the optimizer/data setup.

    L1 normalization: Σ_layers mean_tokens Σ_neurons |h| (see the module doc)."""
    stages: list[Stage] = Field(min_length=1)
    lr: float = Field(1e-4, gt=0, description="peak lr of stages that give none")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of the peak")
    batch_tokens: int = Field(65536, gt=0, description="tokens per optimizer step (all ranks)")
    micro_batch: int = Field(8, gt=0, description="sequences per forward (gradient accumulation)")
    seq_len: int | None = Field(None, gt=0, description="default: spec data.train.seq_len")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    distill: float = Field(0.0, ge=0, le=1, description="weight of KL from the dense source model vs CE")
    l1_control: L1Control | None = None
    checkpoint_every: int = Field(200, gt=0)
    eval_every: int = Field(200, gt=0, description="held-out perplexity/sparsity every N steps")
    log_layers_every: int = Field(50, gt=0, description="per-layer training sparsity in the log every N steps")
    eval_tokens: int = Field(65536, gt=0, description="held-out tokens per training source")
    max_train_tokens: int = Field(DEFAULT_MAX_TRAIN_TOKENS, gt=0,
                                  description="distinct training tokens kept; longer runs repeat them (epochs)")
    activation_checkpointing: bool = False
    compile: bool = False

    def spec_errors(self, spec) -> list[tuple[tuple, str]]:
        """A step is whole windows of seq_len tokens in whole micro-batches (on one rank; train() checks ranks)."""
        seq_len = self.seq_len or spec.data.train.seq_len
        windows = self.batch_tokens // seq_len
        if windows == 0:
            return [(("batch_tokens",), f"must hold at least one window of seq_len {seq_len} tokens, got "
                                        f"{self.batch_tokens}")]
        if windows % min(self.micro_batch, windows):
            return [(("micro_batch",), f"must divide the {windows} windows of a step (batch_tokens "
                                       f"{self.batch_tokens} / seq_len {seq_len}), got {self.micro_batch}")]
        return []


def _check_activations(ir: ModelIR) -> None:
    for layer, expert, ann in ir.ffn_units():
        if ann.activation not in RELU_KINDS:
            raise UserError(f"pipeline relufy: {ffn_label(layer, expert)} has activation {ann.activation}; put "
                            "`drelu` (or relu) before relufy")


def _distributed_device(ctx: Context) -> str:
    """Join the torchrun process group when launched under torchrun; the device this rank trains on."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cuda = ctx.device.startswith("cuda") and torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cuda" if on_cuda else "cpu"


def _windows(tokenizer, sources, seq_len: int, seed: int, split: str, held_out: float, limit: int):
    """Up to `limit` windows [n, seq_len+1] of a mixture's split, as a uint16/uint32 array."""
    import numpy as np

    from tscompile.data import token_stream
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    rows = []
    for seq in token_stream(tokenizer, sources, seq_len + 1, seed, split, held_out):
        rows.append(seq.numpy().astype(dtype))
        if len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"data: no {split} text of {seq_len + 1} tokens in {[s.path for s in sources]}")
    return np.stack(rows)


def _load_or_make(path: Path, make):
    """Token windows kept in work_dir (numpy .npy, no pickle) so a resumed run reads the same data."""
    import numpy as np
    if path.exists():
        return np.load(path, allow_pickle=False)
    arr = make()
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return arr


def _train_spec(ctx: Context):
    train = getattr(getattr(ctx.spec, "data", None), "train", None)
    if train is None:
        raise UserError("spec data.train: the relufy pass needs training text (data.train.mixture)")
    return train


def window_files(ir: ModelIR, cfg: RelufyConfig, ctx: Context) -> tuple[Path, dict[str, Path], int, int]:
    """Where the training and per-source held-out windows live in work_dir (named by a hash of what they
    hold), and how many windows of each: (train file, {source path: held-out file}, n_train, n_heldout)."""
    from tscompile.data import tokenizer_of
    train = _train_spec(ctx)
    seq_len = cfg.seq_len or train.seq_len
    total = sum(s.steps for s in cfg.stages) * cfg.batch_tokens
    n_train = max(1, min(total, cfg.max_train_tokens) // seq_len)
    n_eval = max(1, cfg.eval_tokens // seq_len)
    key = {"mixture": [(s.path, s.weight) for s in train.mixture], "seq_len": seq_len, "seed": ctx.seed,
           "held_out": train.held_out,
           "tokenizer": hashlib.sha256(tokenizer_of(ir).to_str().encode()).hexdigest()}

    def name(kind, **more):
        digest = hashlib.sha256(json.dumps(dict(key, **more), sort_keys=True).encode()).hexdigest()[:16]
        return ctx.work_dir / f"{kind}-{digest}.npy"
    return (name("train", n=n_train), {s.path: name("heldout", source=s.path, n=n_eval) for s in train.mixture},
            n_train, n_eval)


def training_data(ir: ModelIR, cfg: RelufyConfig, ctx: Context):
    """(TokenWindows over the train split, {source path: held-out windows}) from spec.data.train."""
    from tscompile.data import check_window, tokenizer_of
    from tscompile.trainer import TokenWindows
    train = _train_spec(ctx)
    seq_len = cfg.seq_len or train.seq_len
    check_window(ir, seq_len, "relufy")
    tok = tokenizer_of(ir)
    train_file, heldout_files, n_train, n_eval = window_files(ir, cfg, ctx)
    arr = _load_or_make(train_file, lambda: _windows(tok, train.mixture, seq_len, ctx.seed, "train",
                                                     train.held_out, n_train))
    heldout = {s.path: _load_or_make(heldout_files[s.path], lambda s=s: _windows(
        tok, [s], seq_len, ctx.seed, "heldout", train.held_out, n_eval)) for s in train.mixture}
    return TokenWindows(arr, ctx.seed), heldout


def apply_relufy(ir: ModelIR, cfg: RelufyConfig, ctx: Context) -> ModelIR:
    import torch

    from tscompile.passes.profile import forget_measurements, refuse_predictors
    from tscompile.reference import ReferenceModel
    from tscompile.trainer import full_state_dict, train
    _check_activations(ir)
    refuse_predictors(ir, "relufy")
    if cfg.distill > 0 and ctx.source_ir is None:
        raise UserError("pipeline relufy.distill: needs the dense source model as teacher (none in this context)")
    data, heldout = training_data(ir, cfg, ctx)
    device = _distributed_device(ctx)
    torch.manual_seed(ctx.seed)
    model = ReferenceModel.from_ir(ir, torch.float32, device)
    for p in model.parameters():    # on CPU from_ir may alias the IR's in-memory tensors (and the teacher's)
        p.data = p.data.clone()
    teacher = None
    if cfg.distill > 0:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        teacher = ReferenceModel.from_ir(ctx.source_ir, dtype, device).requires_grad_(False)
    budget = ctx.extras.get("max_seconds")     # a job time limit: checkpoint, stop, resume on the next run
    result = train(model, cfg, data, heldout, ctx.work_dir, device, teacher, ctx.log, max_seconds=budget,
                   peak_flops=ctx.extras.get("peak_flops"))
    total = sum(s.steps for s in cfg.stages)
    if result.steps < total:
        raise UserError(f"pipeline relufy: stopped at step {result.steps}/{total} after the {budget:.0f} s time "
                        f"budget; run the build again to resume from {ctx.work_dir}")
    weights = full_state_dict(model)
    out = ir.clone()
    forget_measurements(out)   # measured on the weights before the fine-tune; its held-out sparsity replaces them
    for name, t in weights.items():
        out.weights[name] = t.to(ir.weights[name].dtype)
    final = result.heldout or {}
    per_layer = [sum(v["per_layer_sparsity"][i] for v in final.values()) / len(final) for i in
                 range(len(list(out.ffn_units())))] if final else None
    for i, (_, _, ann) in enumerate(out.ffn_units()):
        if per_layer:
            ann.stats["sparsity"] = per_layer[i]
    out.meta["relufy"] = {"steps": result.steps, "tokens": result.final.get("tokens"),
                          "heldout": {k: {"ppl": v["ppl"], "sparsity": v["sparsity"]} for k, v in final.items()},
                          "final_lambda": result.final.get("lambda"), "tokens_per_second": result.tokens_per_second,
                          "mfu": result.mfu}
    return out


PASS = PassInfo(name="relufy", version="2", doc="ReLUfication fine-tune: LM/KL loss + staged L1 on FFN activations",
                config=RelufyConfig, run=apply_relufy, needs_data=("train",), gpu="optional", requires=("drelu",))
