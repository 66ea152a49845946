"""Runs lowered onnx models through ONNX Runtime with a given SparseFFN kernel library; saves each model's logits.
Started by test_sanitizers.py with LD_PRELOAD=libasan.so, so a sanitizer report kills it (exit != 0).

    python ort_asan_worker.py LIBRARY OUT_DIR PROMPT_IDS FORCED_IDS MODEL.onnx...
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(library: str, out_dir: str, prompt: str, forced: str, *models: str) -> None:
    from tscompile.backends.onnx.runner import OnnxRunner
    prompt_ids, forced_ids = [int(t) for t in prompt.split(",")], [int(t) for t in forced.split(",")]
    for i, model in enumerate(models):
        runner = OnnxRunner(Path(model), Path(library), threads=2)
        np.save(Path(out_dir) / f"{i}.npy", runner.logits(prompt_ids, forced_ids))


if __name__ == "__main__":
    main(*sys.argv[1:])
