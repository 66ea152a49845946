"""weights.bin: the versioned, checksummed weight blob tsrun maps (layout: templates/weights.c.j2).

The tensor order and names here are the ones `expected_tensors()` in weights.c rebuilds from the
compiled dimensions; both sides must change together (bump BLOB_VERSION).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tscompile.cache import atomic_file
from tscompile.ir import ModelIR, check_float16_range, ffn_names, predictor_names

BLOB_MAGIC = b"TSRUNWB\0"
BLOB_VERSION = 2                # 2: experts and top-k in the header, one FFN spec per expert
N_DIMS = 14
FIXED_HEADER = 24 + 4 * N_DIMS + 8   # magic, version, sizes, dtype; dims; rms_eps and a reserved word
FFN_SPEC_BYTES = 24
TENSOR_ENTRY_BYTES = 80
ALIGN = 64
DTYPE_CODES = {"float32": 0, "float16": 1}
ACTIVATION_CODES = {"swiglu": 0, "geglu": 1, "relu": 2, "drelu": 3}
MODE_CODES = {"dense": 0, "exact": 1, "predictor": 2}


@dataclass(frozen=True)
class TensorPlan:
    name: str          # blob name, e.g. "layers.0.w_gate"
    source: str        # HF tensor name in the IR
    transpose: bool    # store source.T (the down projection: [inter, hidden])
    matrix: bool       # stored in the weight dtype (else float32)


def ffn_spec_values(ann) -> tuple[int, int, int, int, float, float]:
    """(activation, mode, predictor rank, predictor relu, threshold, predictor threshold) as stored."""
    p = ann.predictor
    return (ACTIVATION_CODES[ann.activation], MODE_CODES[ann.mode], p.rank if p else 0,
            int(p.relu) if p else 0, float(ann.threshold), float(p.threshold) if p else 0.0)


def _ffn_rows(prefix: str, layer: int, expert: int | None, ann) -> list[TensorPlan]:
    """One FFN's tensors (a layer's MLP or one expert): Wg, Wu, Wd^T and the predictor if it has one."""
    g, u, d = ffn_names(layer, expert)
    rows = [TensorPlan(f"{prefix}w_gate", g, False, True), TensorPlan(f"{prefix}w_up", u, False, True),
            TensorPlan(f"{prefix}w_down_t", d, True, True)]
    if ann.predictor is not None:
        f1, f2 = predictor_names(layer, expert)
        rows += [TensorPlan(f"{prefix}pred_fc1", f1, False, False), TensorPlan(f"{prefix}pred_fc2", f2, False, False)]
    return rows


def tensor_plan(ir: ModelIR) -> list[TensorPlan]:
    """Every tensor of weights.bin, in file order."""
    cfg = ir.config
    plan = [TensorPlan("embed", "model.embed_tokens.weight", False, True)]
    for i, ann in enumerate(ir.layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        rows = [("attn_norm", f"{p}.input_layernorm.weight", False, False),
                ("wq", f"{a}.q_proj.weight", False, True), ("wk", f"{a}.k_proj.weight", False, True),
                ("wv", f"{a}.v_proj.weight", False, True), ("wo", f"{a}.o_proj.weight", False, True)]
        if cfg.attention_bias:
            rows += [("bq", f"{a}.q_proj.bias", False, False), ("bk", f"{a}.k_proj.bias", False, False),
                     ("bv", f"{a}.v_proj.bias", False, False)]
        rows.append(("ffn_norm", f"{p}.post_attention_layernorm.weight", False, False))
        if ann.experts is not None:   # the router stays float32: routing decisions are those of the reference
            rows.append(("router", f"{p}.block_sparse_moe.gate.weight", False, False))
        plan += [TensorPlan(f"layers.{i}.{n}", s, t, m) for n, s, t, m in rows]
        if ann.experts is None:
            plan += _ffn_rows(f"layers.{i}.", i, None, ann)
        else:
            for e, expert in enumerate(ann.experts):
                plan += _ffn_rows(f"layers.{i}.experts.{e}.", i, e, expert)
    plan.append(TensorPlan("final_norm", "model.norm.weight", False, False))
    if not cfg.tie_word_embeddings:
        plan.append(TensorPlan("lm_head", "lm_head.weight", False, True))
    plan.append(TensorPlan("rope_inv_freq", "", False, False))
    return plan


def header_dims(ir: ModelIR) -> list[int]:
    c = ir.config
    return [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim, c.sliding_window or 0, int(c.attention_bias), int(c.tie_word_embeddings),
            -1 if c.bos_token_id is None else int(c.bos_token_id),
            c.eos_ids[0] if c.eos_ids else -1, c.num_experts, c.num_experts_per_tok]


def _tensor_array(ir: ModelIR, t: TensorPlan, dtype: str) -> np.ndarray:
    if t.name == "rope_inv_freq":
        from tscompile.reference import rope_inv_freq
        arr = rope_inv_freq(ir.config).numpy()
    else:
        arr = ir.weights[t.source].detach().float().numpy()
    if t.transpose:
        arr = arr.T
    fp16 = t.matrix and dtype == "float16"
    if fp16:
        check_float16_range(arr, t.source, "arm64")
    arr = np.ascontiguousarray(arr, dtype=np.float16 if fp16 else np.float32)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def write_weights_blob(ir: ModelIR, dtype: str, path: Path) -> int:
    """Writes weights.bin atomically; returns its size in bytes."""
    plan = tensor_plan(ir)
    arrays = [_tensor_array(ir, t, dtype) for t in plan]
    specs = [ffn_spec_values(ann) for _, _, ann in ir.ffn_units()]
    header_size = FIXED_HEADER + FFN_SPEC_BYTES * len(specs) + TENSOR_ENTRY_BYTES * len(plan) + 4
    offset = -(-header_size // ALIGN) * ALIGN
    entries, offsets = [], []
    for t, arr in zip(plan, arrays):
        offsets.append(offset)
        data = memoryview(arr).cast("B")
        entries.append(struct.pack("<48sIIIIQQ", t.name.encode(), 1 if arr.dtype == np.float16 else 0,
                                   arr.shape[0], arr.shape[1], zlib.crc32(data), offset, data.nbytes))
        offset = -(-(offset + data.nbytes) // ALIGN) * ALIGN
    head = BLOB_MAGIC + struct.pack("<IIII", BLOB_VERSION, header_size, len(plan), DTYPE_CODES[dtype])
    head += struct.pack(f"<{N_DIMS}i", *header_dims(ir)) + struct.pack("<fI", ir.config.rms_norm_eps, 0)
    head += b"".join(struct.pack("<iiiiff", *spec) for spec in specs)
    head += b"".join(entries)
    head += struct.pack("<I", zlib.crc32(head))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for off, arr in zip(offsets, arrays):
            f.write(b"\0" * (off - f.tell()))
            f.write(memoryview(arr).cast("B"))
        size = f.tell()
    return size
