"""Runner over an ONNX Runtime session of a lowered decoder: batched prefill, then one token per step."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tscompile.errors import UserError

from .native import LIBRARY_NAME


class OnnxRunner:
    """Drives model.onnx with its KV cache (batch 1). `native`: whether the kernel library is registered."""

    prefill = "batched"

    def __init__(
        self,
        model: Path,
        library: Path | None = None,
        threads: int | None = None,
        profile_prefix: str | None = None,
        prepack: bool = True,
    ):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads sleep instead of spinning (the OMP_WAIT_POLICY=PASSIVE of ORT): on a busy
        # 2-core machine spinning threads halved decode speed
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if library is not None:
            so.register_custom_ops_library(str(library))
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        self.native = library is not None
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _empty_cache(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(self.n_layers) for k in ("key", "value")}

    def _step(self, ids: list[int], cache: dict[str, np.ndarray]) -> np.ndarray:
        """Run `ids` after the cached tokens; updates `cache`; returns logits [len(ids), vocab]."""
        past = next(iter(cache.values())).shape[2]
        feed = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, past + len(ids)), np.int64),
            "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None],
            **cache,
        }
        out = self.session.run(self.outputs, feed)
        for name, value in zip(self.outputs[1:], out[1:]):
            cache[name.replace("present.", "past_key_values.")] = value
        return out[0][0]

    def logits(self, prompt_ids: list[int], forced_ids: list[int]) -> np.ndarray:
        if not prompt_ids:
            raise UserError("onnx runner: the prompt is empty")
        cache = self._empty_cache()
        rows = [self._step(list(prompt_ids), cache)[-1]]
        rows += [self._step([t], cache)[-1] for t in forced_ids]
        return np.stack(rows).astype(np.float32)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        cache = self._empty_cache()
        out: list[int] = []
        logits = self._step(list(prompt_ids), cache)[-1]
        for _ in range(max_new_tokens):
            out.append(int(np.argmax(logits)))
            if len(out) < max_new_tokens:
                logits = self._step([out[-1]], cache)[-1]
        return out

    def decode_tokens_per_second(self, prompt_ids: list[int], n_tokens: int) -> float:
        cache = self._empty_cache()
        tok = int(np.argmax(self._step(list(prompt_ids), cache)[-1]))
        start = time.perf_counter()
        for _ in range(n_tokens):
            tok = int(np.argmax(self._step([tok], cache)[-1]))
        return n_tokens / (time.perf_counter() - start)

    def end_profiling(self) -> str:
        return self.session.end_profiling()


def load(
    outdir: Path,
    dense: bool = False,
    native: bool | None = None,
    threads: int | None = None,
    profile_prefix: str | None = None,
) -> OnnxRunner:
    """dense=True: the dense baseline. native: None = use the kernel library when the artifact has one."""
    outdir = Path(outdir)
    model = outdir / ("dense" if dense else "") / "model.onnx"
    if not model.is_file():
        raise UserError(f"{model}: not found (lower the onnx target first)")
    lib = outdir / LIBRARY_NAME
    if native and not lib.is_file():
        raise UserError(f"{lib}: not found (the native kernel library was not built for this artifact)")
    use_lib = lib if (not dense and native is not False and lib.is_file()) else None
    # The sparse model's FFN weights feed both SparseFFN (as rows) and the prefill Gemms; prepacking would keep a
    # second, packed copy of them (SmolLM2: 1091 MB instead of 534 MB) for no measurable decode gain.
    return OnnxRunner(model, use_lib, threads, profile_prefix, prepack=dense)
