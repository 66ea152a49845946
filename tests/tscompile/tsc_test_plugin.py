"""Test-only plug-in (loaded with `-p tsc_test_plugin` or `plugins: [tsc_test_plugin]`): small real passes and a
lowering-only backend, so the engine's tests do not depend on the built-in passes and backends in progress.

  scale        multiply every FFN down projection by `factor` (optionally pausing, to widen kill windows)
  after_scale  requires `scale` earlier; adds `bias` to the final norm
  wants_data   needs_data=True;  wants_gpu  gpu="required"
  ckpt         backend: the model as an fp32/fp16 checkpoint plus sha256 of every file
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from tscompile.api import BackendInfo, PassConfig, PassInfo
from tscompile.ir import ffn_names


class Stage(PassConfig):
    name: str = "stage"
    lr: PositiveFloat = 1e-4
    steps: PositiveInt = 10


class ScaleConfig(PassConfig):
    factor: PositiveFloat = 1.0
    stages: list[Stage] = []          # only for nested-error tests: not used by the transform
    pause: float = Field(0.0, ge=0)   # seconds to sleep between the transform and returning


def apply_scale(ir, cfg: ScaleConfig, ctx):
    for layer, expert, _ in ir.ffn_units():
        down = ffn_names(layer, expert)[2]
        ir.weights[down] = ir.weights[down] * cfg.factor
    ir.meta["scale_ctx"] = {"device": ctx.device, "work_dir": str(ctx.work_dir), "seed": ctx.seed,
                            "work_dir_exists": ctx.work_dir.is_dir(), "has_source": ctx.source_ir is not None,
                            "source_layers": ctx.source_ir.config.num_layers}
    time.sleep(cfg.pause)
    return ir


class BiasConfig(PassConfig):
    bias: float = 0.5


def apply_bias(ir, cfg: BiasConfig, ctx):
    ir.weights["model.norm.weight"] = ir.weights["model.norm.weight"] + cfg.bias
    return ir


def _identity(ir, cfg, ctx):
    return ir


PASSES = [
    PassInfo("scale", "1", "scale FFN down projections (test)", ScaleConfig, apply_scale),
    PassInfo("after_scale", "1", "bias the final norm; needs scale first (test)", BiasConfig, apply_bias,
             requires=("scale",)),
    PassInfo("wants_data", "1", "needs data (test)", PassConfig, _identity, needs_data=True),
    PassInfo("wants_gpu", "1", "needs a GPU (test)", PassConfig, _identity, gpu="required"),
]


class CkptConfig(PassConfig):
    dtype: Literal["float32", "float16"] = "float32"
    pause: float = Field(0.0, ge=0)   # seconds between writing the checkpoint and its checksums


def lower_ckpt(ir, cfg: CkptConfig, outdir: Path, ctx) -> dict:
    import torch
    out = ir.clone()
    for name in list(out.weights):
        out.weights[name] = out.weights[name].to(getattr(torch, cfg.dtype))
    out.save(outdir / "model")
    time.sleep(cfg.pause)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((outdir / "model").iterdir())}
    (outdir / "checksums.json").write_text(json.dumps(sums, indent=1))
    (outdir / "checksums.json").chmod(0o600)      # as safetensors and mkstemp make files: published ordinary
    return {"n_files": len(sums), "dtype": cfg.dtype}


def load_ckpt(outdir: Path, dense: bool = False, **opts):
    raise NotImplementedError("the ckpt test backend only lowers")


BACKENDS = [BackendInfo("ckpt", "1", "checkpoint copy (test backend)", CkptConfig, lower_ckpt, load_ckpt,
                       available=lambda: os.environ.get("TSC_TEST_CKPT_UNAVAILABLE"))]


def fake_distribution(root: Path, group: str, entry: str, module: str, source: str) -> None:
    """An installed distribution in `root` (put it on sys.path): one entry point `entry = module:ATTR` in `group`,
    and `module.py` with `source`."""
    name = module.replace("_", "-")
    info = root / f"{module}_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    (root / f"{module}.py").write_text(source)


def tiny_spec(name: str = "t", pipeline: str = "[]", targets: str = "{}", extra: str = "") -> str:
    """Spec text for a 1-layer tiny model with this plug-in loaded."""
    return (f"version: 1\nname: {name}\nplugins: [tsc_test_plugin]\n"
            "source: {tiny: {family: llama, layers: 1, hidden: 32, intermediate: 64, heads: 2, kv_heads: 1, "
            "vocab: 300}}\n"
            f"pipeline: {pipeline}\ntargets: {targets}\n{extra}")
